"""Merge an adapter into a dequantized copy of its base: a plain transformers model, no peft or bitsandbytes needed.

    falcon-qlora merge --adapter results/final --out merged            # bf16 on a GPU, fp32 on a CPU
    falcon-qlora merge --adapter results/final --out merged --dtype fp32 --push_to_hub me/falcon-7b-guanaco
    from falcon_qlora.merge import merge; merge("results/final", "merged")

The adapter was trained against the NF4-rounded base, so that is what it is merged into: the 4-bit layers are
dequantized first (merging into NF4 itself would round most of the update away). Before anything is written, the
merged model's logits are compared with base + adapter on a few inputs. Merging the same adapter into the same
folder again does nothing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError

MARKER = "falcon_qlora_merge.json"
CHECK_TEXTS = ("### Human: What is QLoRA? ### Assistant:",
               "### Human: Write a haiku about the sea. ### Assistant: Waves fold into foam",
               "### Human: what is two plus three? ### Assistant: two plus three is five.")
# Relative L2 error of the logits allowed between the merged model and 4-bit base + adapter, both computed in fp32.
# Measured floor: ~3e-7 on the CPU (tests/test_merge.py), see bench/RESULTS.md for a 7B shape on a GPU; an adapter
# merged at twice its scale or into another base is orders of magnitude above it.
TOLERANCE = 1e-4
DTYPES = ("fp32", "bf16", "fp16")


def adapter_digest(adapter: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        h.update((adapter / name).read_bytes())
    return h.hexdigest()[:16]


def already_merged(adapter: Path, out: Path) -> str | None:
    marker = out / MARKER
    if (adapter / MARKER).is_file():
        return f"{adapter} is already a merged model (it has {MARKER}); nothing to merge"
    if marker.is_file() and json.loads(marker.read_text()).get("adapter_sha256") == adapter_digest(adapter):
        return f"{out} already holds this adapter merged into its base; nothing to do"
    return None


def _logits(model, tok, device):
    import torch
    with torch.no_grad():
        return [model(**{k: v.to(device) for k, v in tok(t, return_tensors="pt").items()}).logits.float().cpu()
                for t in CHECK_TEXTS]


def merge(adapter: str | Path, out: str | Path, dtype: str = "auto", base: str | None = None,
          push_to_hub: str | None = None, allow_other_base: bool = False) -> Path:
    """Dequantize the 4-bit base, merge the adapter, check logits against base + adapter, then write safetensors
    shards, the tokenizer and a model card to `out`. Returns `out`. A base other than the one the adapter was
    trained on (same shapes, other weights) is refused unless allow_other_base (then it is a warning).

    The check runs in fp32 on both sides (the 4-bit layers compute in fp32 for the reference), so it measures the
    merge and not the rounding of a bf16 forward; the merged weights are cast to `dtype` only afterwards."""
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise UserError(f"adapter folder {adapter} does not exist")
    done = already_merged(adapter, out)
    if done:
        print(done)
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} exists and is not empty: choose a new --out folder")
    merged, tok, cfg, name, err = checked_merge(adapter, dtype, base, allow_other_base)
    _write(merged, tok, cfg, adapter, out, name, err)
    if push_to_hub:
        from .publish import publish
        publish(out, push_to_hub, cfg)
    return out


def checked_merge(adapter: str | Path, dtype: str = "auto", base: str | None = None,
                  allow_other_base: bool = False):
    """The merge and its check, nothing written (merge and export both call it): the 4-bit base + adapter computing
    in fp32 is the reference, the merged model must match it, then it is cast to `dtype`.
    Returns (merged model in eval mode, tokenizer, run config, dtype name, relative logit error). A base other than
    the one the adapter was trained on (same shapes, other weights) is refused unless allow_other_base (a warning)."""
    import torch
    from .config import make_config, to_dict
    from .model import load_adapter_model, resolve_compute_dtype, warn_other_base
    from .rundir import load_run_config
    adapter = Path(adapter)
    cfg = load_run_config(adapter)
    name = dtype if dtype != "auto" else DTYPES[[torch.float32, torch.bfloat16, torch.float16].index(
        resolve_compute_dtype(cfg))]
    fp32 = make_config(**{**to_dict(cfg), "compute_dtype": "fp32"})
    model, tok, _ = load_adapter_model(adapter, base=base, cfg=fp32,  # 4-bit base + adapter, computing in fp32
                                       on_other_base=warn_other_base if allow_other_base else _refuse_other_base)
    device = next(p.device for p in model.parameters())
    reference = _logits(model, tok, device)
    merged = merged_model(model.unload(), adapter)
    err = _relative_error(_logits(merged, tok, device), reference)
    if not err < TOLERANCE:
        raise UserError(f"merged logits differ from base + adapter by {err:.2g} (relative, both in fp32; allowed "
                        f"{TOLERANCE:g}): the merge is wrong, nothing was written")
    print(f"merged model matches base + adapter: relative logit error {err:.1e} (fp32, {len(CHECK_TEXTS)} inputs)")
    merged = merged.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name])
    if name != "fp32":
        cast = _relative_error(_logits(merged, tok, device), reference)
        print(f"saved in {name}: its rounding moves the logits by {cast:.1e} (relative)")
    return merged, tok, cfg, name, err


def merged_model(base_model, adapter: Path):
    """The 4-bit base dequantized to fp32 (exact NF4 values, so the merge adds no rounding), the adapter merged in."""
    import torch
    from peft import PeftModel
    from .model import check_trainable_layout
    check_trainable_layout(base_model, "dequantizing")
    base_model.dequantize(dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload()
    return merged.float().eval()


def _relative_error(got, reference) -> float:
    return max(float((g - r).norm() / r.norm()) for g, r in zip(got, reference))


def _write(merged, tok, cfg, adapter: Path, out: Path, dtype: str, err: float) -> None:
    from .publish import known_metrics, model_card
    from .rundir import RunDir, save_run_config
    out.mkdir(parents=True, exist_ok=True)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.config.use_cache = True
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tok.save_pretrained(out)
    save_run_config(cfg, out)
    RunDir(out).card.write_text(model_card(cfg, "merged", known_metrics(adapter)), encoding="utf-8")
    (out / MARKER).write_text(json.dumps({"adapter": str(adapter.resolve()), "adapter_sha256": adapter_digest(adapter),
                                          "base": cfg.model_name_or_path, "dtype": dtype,
                                          "max_relative_logit_error": err}, indent=2) + "\n", encoding="utf-8")
    print(f"written to {out} (safetensors, tokenizer, model card); load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _refuse_other_base(problem: str):
    raise UserError(f"{problem}: the merged model would hold the adapter on other weights. Pass --base with the "
                    "model it was trained on, or --allow_other_base to merge anyway")


def cli(argv: list[str]) -> int:
    from .cli import CommandParser
    p = CommandParser(prog="falcon-qlora merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder written by `falcon-qlora train`")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights of the merged model (auto: the training compute dtype)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--push_to_hub", metavar="REPO", help="upload the merged folder to this hub repo")
    p.add_argument("--allow_other_base", action="store_true",
                   help="merge into a --base whose weights differ from the one the adapter was trained on")
    a = p.parse_args(argv)
    merge(a.adapter, a.out, a.dtype, a.base, a.push_to_hub, a.allow_other_base)
    return 0
