"""Export a fine-tuned model as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    falcon-qlora export --adapter results/final --out model.gguf                  # f16
    falcon-qlora export --adapter results/final --out model-q4.gguf --quant q4_k_m
    falcon-qlora export --model merged --out model.gguf --quant q8_0            # a merged (or any plain) folder
    from falcon_qlora.export import export; export("results/final", "model.gguf", quant="q8_0")

An adapter is merged exactly as `falcon-qlora merge` does it (dequantized base + adapter, logits checked) and the
merged model is written with the gguf package: f32, f16, bf16 and q8_0 by the gguf package alone; k-quants
(q4_k_m and friends) by llama.cpp's own quantizer from an f16 intermediate (extra: falcon-qlora[gguf]). Everything
is checked before the merge starts (architecture, quant type, output path, free disk), and the file appears under
its name only when complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import gguf_file, llamacpp
from .errors import UserError

QUANTS = list(gguf_file.WRITTEN) + list(llamacpp.FTYPES)
# On top of the tensor bytes: the vocabulary and merges (under 64 bytes per token with its merge), the chat template
# and alignment (under 1 MiB). k-quant sizes: llamacpp.bits_per_weight per tensor, plus 5 % (without it, the
# q4_k_m files llama.cpp wrote for Falcon-7B and SmolLM2 came out at 1.04x the estimate: bench/raw/cpu_export_7b_q4.json,
# bench/raw/gguf_demo_llamacpp.json).
META_PER_TOKEN, META_FIXED, KQUANT_MARGIN = 64, 2**20, 1.05


def _source_config(adapter: Path | None, model: Path | None, base: str | None):
    """(model config, run config, base path) of what is being exported, read without loading any weights."""
    from transformers import AutoConfig
    from .model import adapter_base, resolve_model_path
    from .rundir import load_run_config
    folder = adapter or model
    cfg = load_run_config(folder)
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{adapter} has no adapter_config.json: pass the folder `falcon-qlora train` wrote "
                            "(e.g. results/final), or a merged model folder with --model")
        path = resolve_model_path(base or adapter_base(adapter, cfg))
    else:
        path = resolve_model_path(str(model))
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False), cfg, path
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the model config of {path}: {str(err).splitlines()[0][:160]}") from None


def estimate_bytes(config, quant: str) -> tuple[int, int]:
    """(final file bytes, bytes needed on disk while exporting), from the config alone (a meta-device model)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    meta = META_FIXED + META_PER_TOKEN * config.vocab_size
    written = quant if quant in gguf_file.WRITTEN else "f16"
    first = sum(t.nbytes for t in gguf_file.tensor_plan(config, shapes, written)) + meta
    if quant in gguf_file.WRITTEN:
        return first, first
    bits = sum(t.numel() * llamacpp.bits_per_weight(quant, tuple(t.shape), config.vocab_size)
               for k, t in shapes.items() if not (k == "lm_head.weight" and config.tie_word_embeddings))
    final = int(bits / 8 * KQUANT_MARGIN) + meta
    return final, first + final


def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{folder} has {free / 2**30:.1f} GiB free but the export needs about {need / 2**30:.1f} GiB: "
                        "free some space or choose another --out")


def _load_model(model: Path, path: str, cfg):
    from transformers import AutoModelForCausalLM
    from .model import load_tokenizer
    tok = load_tokenizer(path, cfg)
    # In the dtype it was saved in: the writer widens one tensor at a time to fp32 (exact from bf16/f16), so the file
    # is the same as from an fp32 load, in half the host memory for a bf16 folder.
    merged = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=False)
    return merged.eval(), tok


def export(adapter: str | Path | None = None, out: str | Path = "model.gguf", quant: str = "f16",
           model: str | Path | None = None, base: str | None = None, force: bool = False,
           allow_other_base: bool = False) -> Path:
    """Merge (if given an adapter) and write `out` as GGUF plus `<out stem>.Modelfile`. Returns `out`."""
    from .merge import MARKER, checked_merge
    from .modelfile import chat_format, modelfile
    if quant not in QUANTS:
        raise UserError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if (adapter is None) == (model is None):
        raise UserError("pass either --adapter (a trained adapter folder) or --model (a merged or plain model folder)")
    out = Path(out)
    modelfile_path = out.with_suffix(".Modelfile")
    src = Path(adapter if adapter is not None else model)
    if not src.is_dir() and not (model is not None and not str(model).startswith((".", "/", "~"))):
        raise UserError(f"{'adapter' if adapter is not None else 'model'} folder {src} does not exist")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out} should end in .gguf (llama.cpp and Ollama look for that extension)")
    for path in (out, modelfile_path):
        if path.exists() and not force:
            raise UserError(f"{path} already exists: choose another --out or pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UserError(f"the folder {out.parent} of --out does not exist")
    config, cfg, path = _source_config(Path(adapter) if adapter is not None else None,
                                       Path(model) if model is not None else None, base)
    reason = gguf_file.unsupported(config)
    if reason:
        raise UserError(reason)
    if quant not in gguf_file.WRITTEN:
        llamacpp.binding()   # fails here, in one line naming the extra, rather than after the merge
    final, need = estimate_bytes(config, quant)
    _check_disk(out.parent, need)
    if adapter is not None:
        # fp32: no rounding before the GGUF's own
        merged, tok, cfg, _, _ = checked_merge(adapter, "fp32", base, allow_other_base)
        trained = True
    else:
        merged, tok = _load_model(src, path, cfg)
        trained = (src / MARKER).is_file()
    template, stops = chat_format(tok)
    text = modelfile(out.name, tok, template, stops)   # fails (one line) before anything is written
    name = f"{Path(cfg.model_name_or_path).name} fine-tuned with falcon-qlora" if trained else src.name
    size = _write_atomically(out, merged, tok, template, quant, name)
    tmp = modelfile_path.with_name(f".{modelfile_path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, modelfile_path)
    print(f"written {out} ({quant}, {size / 2**20:.1f} MiB; estimated {final / 2**20:.1f} MiB) and {modelfile_path}")
    print(f"run it:  llama-cli -m {out} -cnv      or:  ollama create {out.stem.lower()} -f {modelfile_path} && "
          f"ollama run {out.stem.lower()}")
    return out


def _write_atomically(out: Path, merged, tok, template: str, quant: str, name: str) -> int:
    """Write under a temporary name in the same folder, rename at the end; nothing is left behind on failure."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    inter = out.with_name(f".{out.stem}.f16.tmp-{os.getpid()}.gguf")
    try:
        if quant in gguf_file.WRITTEN:
            gguf_file.write(tmp, merged, tok, template, quant, name)
        else:
            gguf_file.write(inter, merged, tok, template, "f16", name)   # what llama-quantize is usually given
            del merged
            llamacpp.quantize(inter, tmp, quant)
        os.replace(tmp, out)
    finally:
        for p in (tmp, inter):
            p.unlink(missing_ok=True)
    return out.stat().st_size


def cli(argv: list[str]) -> int:
    from .cli import CommandParser
    p = CommandParser(prog="falcon-qlora export", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="adapter folder written by `falcon-qlora train` (merged as `merge` does)")
    src.add_argument("--model", help="a merged or plain transformers model folder (or the alias smollm2-135m)")
    p.add_argument("--out", required=True, help="the .gguf file to write; <name>.Modelfile is written beside it")
    p.add_argument("--quant", default="f16", metavar="TYPE",
                   help=f"f16 (default), bf16, f32, q8_0 (gguf package); {', '.join(llamacpp.FTYPES)} (llama.cpp, "
                        f"needs falcon-qlora[gguf])")
    p.add_argument("--base", help="base model of the adapter (default: the one it was trained on)")
    p.add_argument("--force", action="store_true", help="overwrite --out and its Modelfile if they exist")
    p.add_argument("--allow_other_base", action="store_true",
                   help="merge into a --base whose weights differ from the one the adapter was trained on")
    a = p.parse_args(argv)
    export(a.adapter, a.out, a.quant.lower(), a.model, a.base, a.force, a.allow_other_base)
    return 0
