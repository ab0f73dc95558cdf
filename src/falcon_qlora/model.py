"""Model stage: tokenizer, the 4-bit base (really 4-bit, checked), and the LoRA adapter.

    tok = load_tokenizer(cfg.model_name_or_path, cfg)
    model = load_base_model(cfg)          # NF4 + double quant; raises if the target layers are not Linear4bit
    model = attach_lora(model, cfg)       # peft PeftModel, only the adapter trains
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

from . import embedded
from .config import RunConfig
from .errors import UserError

# Built-in model names -> a function returning a local folder (filled in by the modules that own them).
MODEL_ALIASES: dict[str, Callable[[], str]] = {"smollm2-135m": embedded.smollm2_path}


def resolve_model_path(name: str, need_config: bool = True) -> str:
    """Alias -> local folder; an existing path -> itself; anything else is a hub name, returned unchanged."""
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    if os.path.exists(name):
        if need_config and not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"model folder {name} has no config.json: point model_name_or_path at a folder saved "
                            "with save_pretrained, or at a hub name")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist: check model_name_or_path")
    return name


def is_local_model(name: str) -> bool:
    return name in MODEL_ALIASES or os.path.isdir(name)


def resolve_compute_dtype(cfg: RunConfig):
    """auto: bf16 on GPUs that have it, fp16 (+ fp32 layer norms) on older ones such as the T4, fp32 on CPU."""
    import torch
    choice = cfg.compute_dtype
    cuda = torch.cuda.is_available()
    if choice == "auto":
        if not cuda:
            choice = "fp32"
        elif torch.cuda.is_bf16_supported():
            choice = "bf16"
        else:
            warnings.warn(f"{torch.cuda.get_device_name()} has no bf16: training in fp16 with layer norms in fp32. "
                          "Watch for NaN losses (falcon-qlora stops on them).", stacklevel=2)
            choice = "fp16"
    if choice == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"compute_dtype=bf16 is not supported on {torch.cuda.get_device_name()}: "
                        "set compute_dtype=fp16 (or auto)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def load_tokenizer(path_or_name: str, cfg: RunConfig):
    """Tokenizer with a pad token distinct from EOS (so EOS keeps its label and the model learns to stop)."""
    from transformers import AutoTokenizer
    path = resolve_model_path(path_or_name, need_config=False)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if tok.eos_token is None:
        raise UserError(f"the tokenizer of {path} has no EOS token: the model could not learn to stop")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = pick_pad_token(tok)
    tok.padding_side = "right"
    return tok


def pick_pad_token(tok) -> str:
    """An existing special token that is neither EOS nor BOS (Falcon: >>TITLE<< etc.), so the vocabulary and the
    embedding matrix stay as they are; else the unknown token; else (GPT-2-style tokenizers, EOS their only special
    token) EOS itself. Padding with EOS is safe here because TRL's collator masks padding by position (labels are
    padded with -100, never derived from the pad id), so the EOS that ends every row keeps its label."""
    taken = {tok.eos_token, tok.bos_token}
    for t in [tok.unk_token, *tok.all_special_tokens]:
        if t and t not in taken:
            return t
    return tok.eos_token


@contextlib.contextmanager
def falcon_linear_as_nn_linear():
    """transformers >= 5.5 converts only modules whose type is exactly nn.Linear to bnb.nn.Linear4bit, and Falcon's
    layers are FalconLinear (a subclass with the same forward), so Falcon silently loads unquantized. While the model
    is built, make FalconLinear *be* nn.Linear; restore it afterwards so nothing outside loading changes."""
    import torch.nn as nn
    try:
        import transformers.models.falcon.modeling_falcon as mf
    except ImportError:
        yield
        return
    original = mf.FalconLinear
    mf.FalconLinear = nn.Linear
    try:
        yield
    finally:
        mf.FalconLinear = original


def bnb_config(cfg: RunConfig, dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=_quant_storage(dtype))


def _quant_storage(dtype):
    """Under FSDP the packed 4-bit weights must share the compute dtype so they can be sharded with the rest."""
    import torch
    from .distributed import fsdp_enabled
    return dtype if fsdp_enabled() else torch.uint8


def device_map():
    """Each process loads its own copy on its own GPU (data parallel); None on CPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def load_base_model(cfg: RunConfig, path: str | None = None, load_in_4bit: bool | None = None):
    """The base model, 4-bit NF4 by default; stops with a clear error if the 4-bit load did not happen."""
    import torch
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(path or cfg.model_name_or_path)
    quantize = cfg.load_in_4bit if load_in_4bit is None else load_in_4bit
    dtype = resolve_compute_dtype(cfg)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, device_map=device_map())
    if not cfg.allow_pickle:
        kwargs["use_safetensors"] = True
    if quantize:
        kwargs["quantization_config"] = bnb_config(cfg, dtype)
    try:
        with falcon_linear_as_nn_linear() if quantize else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        msg = str(err).splitlines()[0]
        if "safetensors" in msg or "use_safetensors" in msg:
            raise UserError(f"{path} has no .safetensors weights; pickle files (.bin) are refused because they can "
                            "run code. Convert the weights, or set allow_pickle=true if you trust them") from None
        raise UserError(f"cannot load the model {path}: {msg}") from None
    check_targets(model, cfg.lora_target_modules)
    if quantize:
        assert_4bit(model, cfg.lora_target_modules)
        keep_trainable_layout(model)
    if dtype == torch.float16:
        _norms_to_fp32(model)
    model.config.use_cache = False
    return model


def _norms_to_fp32(model):
    """fp16 training (T4): layer norms in fp32, where fp16 overflows first on Falcon."""
    import torch
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower():
            module.to(torch.float32)


def count_linear4bit(model) -> int:
    import bitsandbytes as bnb
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def keep_trainable_layout(model) -> int:
    """Turn off bitsandbytes' CPU repacking on every Linear4bit; returns how many layers there are.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a Linear4bit's weight into an inference-only layout the
    first time the layer runs in eval mode without grad, and never undoes it. Training from that layout runs a
    kernel without autograd (wrong gradients), dequantize() returns wrong weights, and bitsandbytes' own inverse
    is lossy. The packed kernel computes in bf16 whatever the compute dtype, so eval and chat would also stop
    matching training numerics: falcon-qlora keeps the trainable layout everywhere (bench/cpu_repack.py)."""
    import bitsandbytes as bnb
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def repacked_layers(model) -> list[str]:
    """Names of Linear4bit layers whose weight is in bitsandbytes' CPU inference layout (see keep_trainable_layout)."""
    import bitsandbytes as bnb
    return [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
            and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]


def check_trainable_layout(model, action: str) -> None:
    """The guard where training starts and where merge dequantizes: a repacked weight cannot be restored exactly,
    so it stops the run, naming the layer. Otherwise repacking is turned off for whatever runs next."""
    bad = repacked_layers(model)
    if bad:
        raise UserError(f"{len(bad)} 4-bit layers ({bad[0]}{', ...' if len(bad) > 1 else ''}) are in bitsandbytes' "
                        f"CPU inference layout (repacked by an eval-mode forward on a CPU with AVX512-BF16); {action} "
                        "from it would be wrong. Load the model with falcon_qlora.model.load_base_model (or call "
                        "keep_trainable_layout(model) right after loading it) and run again")
    keep_trainable_layout(model)


def assert_4bit(model, target_modules: list[str]) -> int:
    """Every linear layer named in target_modules must be a bnb.nn.Linear4bit; returns how many there are."""
    import bitsandbytes as bnb
    import torch.nn as nn
    bad, good = [], 0
    for name, module in model.named_modules():
        if name.split(".")[-1] in target_modules and isinstance(module, nn.Linear):
            if isinstance(module, bnb.nn.Linear4bit):
                good += 1
            else:
                bad.append(f"{name} ({type(module).__name__})")
    if bad or not good:
        shown = ", ".join(bad[:3]) or "no target layer found"
        raise UserError(f"the model was asked for in 4-bit but {len(bad)} target layers are not bnb Linear4bit "
                        f"({shown}): this is not QLoRA. Check the transformers/bitsandbytes versions "
                        "(falcon-qlora doctor)")
    return good


def lora_config(cfg: RunConfig):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias=cfg.lora_bias,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")


def check_targets(model, target_modules: list[str]) -> None:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        import torch.nn as nn
        linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(f"lora_target_modules: {', '.join(missing)} not found in {type(model).__name__}; "
                        f"its linear layers are: {', '.join(linears)}")


def check_targets_early(cfg: RunConfig, model=None) -> None:
    """lora_target_modules against the model's module names before anything is written: from the model passed in,
    else from an empty model built on the 'meta' device from its config alone (no weights are read)."""
    if model is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path),
                                                trust_remote_code=cfg.trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        except Exception:  # noqa: BLE001 - the real load says what is wrong, in one line
            return
    check_targets(model, cfg.lora_target_modules)


def attach_lora(model, cfg: RunConfig):
    """Wrap the base in a peft LoRA model; only the adapter's parameters train."""
    from peft import get_peft_model
    check_targets(model, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(cfg))


def _param_count(p) -> int:
    """A 4-bit weight packs several parameters per stored element (2 in uint8, 4 in the bf16 storage FSDP uses):
    count the original ones, so the figure is the same however the weights are stored."""
    qs = getattr(p, "quant_state", None)
    return qs.shape.numel() if qs is not None else p.numel()


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_param_count(p) for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def adapter_base(adapter_dir: Path, cfg: RunConfig) -> str:
    """The base an adapter was trained on: its run config's model, else peft's base_model_name_or_path."""
    import json
    from .rundir import has_run_config
    if has_run_config(adapter_dir):
        return cfg.model_name_or_path
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


FINGERPRINT_TENSORS, FINGERPRINT_BYTES = 8, 1 << 16


def _weight_files(name: str) -> list[Path]:
    """The base's .safetensors files: a local folder's, or a hub model's in the local cache (none if not cached)."""
    path = resolve_model_path(name, need_config=False)
    if not os.path.isdir(path):
        from huggingface_hub import try_to_load_from_cache
        hits = [try_to_load_from_cache(path, f) for f in ("model.safetensors.index.json", "model.safetensors")]
        hits = [h for h in hits if isinstance(h, str)]
        if not hits:
            return []
        path = os.path.dirname(hits[0])
    return sorted(Path(path).glob("*.safetensors"))


def base_fingerprint(name: str) -> str | None:
    """A short hash that tells bases of the same shapes apart: the names, dtypes, shapes and first 64 KiB of 8
    weight matrices spread over the model, read straight from the safetensors files (their header says where each
    tensor lies). Milliseconds on a 7B, and the same whether the base is later loaded in 4-bit or in bf16.
    None when the weights are not safetensors files on this machine."""
    import hashlib
    import json
    entries = []
    for f in _weight_files(name):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        entries += [(k, v, f, 8 + n) for k, v in header.items() if k != "__metadata__"]
    entries = sorted([e for e in entries if len(e[1]["shape"]) == 2] or entries, key=lambda e: e[0])
    if not entries:
        return None
    k = min(FINGERPRINT_TENSORS, len(entries))
    h = hashlib.sha256()
    for key, meta, f, offset in (entries[i * (len(entries) - 1) // max(k - 1, 1)] for i in range(k)):
        start, end = meta["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(offset + start)
            h.update(json.dumps([key, meta["dtype"], meta["shape"]]).encode() + fh.read(min(end - start,
                                                                                        FINGERPRINT_BYTES)))
    return h.hexdigest()[:16]


def save_fingerprint(name: str, run_dir: Path) -> Path:
    """Record which base the adapter is trained on (copied into every checkpoint and final/)."""
    import json
    from .rundir import RunDir
    path = RunDir(run_dir).fingerprint
    path.write_text(json.dumps({"base": name, "fingerprint": base_fingerprint(name)}) + "\n", encoding="utf-8")
    return path


def other_base(adapter_dir: Path, base: str) -> str | None:
    """None when `base` is the base the adapter was trained on (or nothing was recorded); else why not."""
    import json
    from .rundir import RunDir
    try:
        saved = json.loads(RunDir(adapter_dir).fingerprint.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    now = base_fingerprint(base) if saved.get("fingerprint") else None
    if now is None or now == saved["fingerprint"]:
        return None
    return (f"{base} is not the base this adapter was trained on ({saved.get('base')}): same shapes, other weights "
            f"(fingerprint {now}, trained on {saved['fingerprint']})")


def warn_other_base(problem: str) -> None:
    import sys
    print(f"falcon-qlora: warning: {problem}; its outputs are not what the adapter learned", file=sys.stderr,
          flush=True)


def load_adapter_model(adapter_dir: str | Path, base: str | None = None, load_in_4bit: bool = True,
                       cfg: RunConfig | None = None, on_other_base: Callable[[str], None] = warn_other_base):
    """Base (from the run config saved beside the adapter, unless given) + the adapter. -> (model, tok, cfg).
    A base whose weights differ from the recorded fingerprint calls `on_other_base` (default: a one-line warning)
    before anything is loaded."""
    from peft import PeftModel
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} has no adapter_config.json: pass the folder that `falcon-qlora train` "
                        "wrote (e.g. results/final or results/checkpoint-N)")
    if cfg is None:
        from .rundir import load_run_config
        cfg = load_run_config(adapter_dir)
    base = base or adapter_base(adapter_dir, cfg)
    problem = other_base(adapter_dir, base)
    if problem:
        on_other_base(problem)
    tok = load_tokenizer(str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base, cfg)
    model = load_base_model(cfg, path=base, load_in_4bit=load_in_4bit)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError) as err:
        raise UserError(f"the adapter in {adapter_dir} does not fit the base {base}: "
                        f"{str(err).splitlines()[0][:200]}. Pass --base with the model it was trained on") from None
    # The adapter loads in fp32, the dtype falcon-qlora trains it in (see train.py), so logits match training.
    model.eval()
    return model, tok, cfg
