"""Speed and memory profiles: the same training as the reference recipe, computed faster or in less memory.

    profile = resolve_profile(cfg)                                  # auto -> speed | memory | reference
    model, args, trainer_kwargs = apply_profile(cfg, model, args, tokenizer, profile)  # args: SFTConfig

What a profile changes (each measured in bench/NOTES.md; none changes what is learned; the patched forwards live
in fast_paths.py, the offloading in offload.py):
  - padding-free batches: the rows of a micro-batch are laid end to end in one sequence, so no compute is spent on
    padding; the loss is still the mean over the same real tokens of the same rows.
  - Falcon attention through SDPA's fused kernels, one causal block per row (no attention across rows), instead of
    the materialised (rows, 71, L, L) mask and fp32 softmax that the stock code falls back to.
  - layer-norm outputs in the compute dtype: under autocast they come out in fp32 and drag every activation after
    them (the 18176-wide MLP ones too) into fp32; the residual stream itself stays fp32, as in the reference.
  - each LoRA layer as one GEMM: addmm(result, A(dropout(x)), B^T, alpha=scale) instead of peft's clone/mul/add.
  - speed: no gradient checkpointing, the effective batch in as few micro-batches as free memory allows (estimated
    for Falcon-7B's widths: conservative for smaller models), fused torch AdamW instead of paged bnb AdamW 32-bit.
  - memory: gradient checkpointing kept, its layer inputs in pinned host memory (offload.py), so micro-batches of up
    to MEMORY_ROWS rows fit in the reference's memory; narrower tiles in TRL's fused LM head.
Generation, eval of padded batches and non-Falcon models fall through to the stock code paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import RunConfig
from .errors import UserError
from .fast_paths import norms_in_compute_dtype, patch_falcon_attention, patch_lora_forward, unwrap

PROFILES = ("reference", "speed", "memory")
GiB = 2**30


# --------------------------------------------------------------------------------------------- choosing a profile
def resolve_profile(cfg: RunConfig, free_bytes: int | None = None) -> str:
    """auto -> speed where the GPU holds the job without checkpointing at micro-batch >= 4, else memory;
    reference on CPU (the profiles' kernels only pay on a GPU). free_bytes: the GPU's free memory (default: this
    GPU's); given without a GPU, it stands for an assumed one (what `estimate --gpu_memory` plans with)."""
    import os
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and cfg.profile in ("speed", "memory"):
        # the profiles patch LoRA and attention forwards in ways FSDP's flat parameters do not allow (measured:
        # "Output 0 of ViewBackward0 is a view ... modified inplace")
        raise UserError(f"profile={cfg.profile} is not supported under FSDP: use profile=reference or auto")
    if cfg.profile != "auto":
        return cfg.profile
    import torch
    if fsdp or (free_bytes is None and not torch.cuda.is_available()):
        return "reference"
    free = free_bytes if free_bytes is not None else torch.cuda.mem_get_info()[0]
    mb = micro_batch_for(cfg, free)
    return "speed" if mb >= min(4, _effective_batch(cfg)) else "memory"


def _effective_batch(cfg: RunConfig) -> int:
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps


# Activation bytes per trained token, per layer and per unit of hidden size, of the speed profile (bf16, no
# checkpointing, LoRA with dropout). Measured on the H200 (bench/RESULTS.md): peak allocated 47.65 GiB at 8,177
# tokens, less ~5.8 GiB of weights, LoRA, grads and optimizer state -> 37.8 B. The margin covers fragmentation.
ACT_BYTES = 38.0
MARGIN = 1.15
FALCON_7B = {"hidden": 4544, "layers": 32, "p4bit": 6.63e9, "other": 0.30e9}


def static_bytes(n_params_4bit: float, n_lora: float, n_other: float) -> float:
    """Packed NF4 weights (+ absmax), bf16 embeddings/norms, LoRA weights in fp32 + grads + two fp32 Adam states."""
    return n_params_4bit * 0.53 + n_other * 2 + n_lora * 16


def estimate_peak(cfg: RunConfig, tokens: int, dims: dict | None = None) -> float:
    """Bytes of GPU memory the speed profile needs for a micro-batch of `tokens` (Falcon-7B dims unless given)."""
    d = dims or FALCON_7B
    lora = d["layers"] * cfg.lora_r * d["hidden"] * (2 + 1 + 1 + 1 + 4 + 4 + 1)  # A+B of the 4 Falcon linears
    return MARGIN * (static_bytes(d["p4bit"], lora, d["other"]) + tokens * d["layers"] * d["hidden"] * ACT_BYTES)


def micro_batch_for(cfg: RunConfig, free_bytes: int, effective: int | None = None, dims: dict | None = None) -> int:
    """The largest divisor of the effective batch whose micro-batch fits in free_bytes (0 if none does)."""
    eff = effective or _effective_batch(cfg)
    return next((mb for mb in _divisors(eff) if estimate_peak(cfg, mb * cfg.max_length, dims) <= free_bytes), 0)


def _divisors(n: int) -> list[int]:
    """Micro-batch sizes that split n rows evenly, largest first."""
    return [m for m in range(n, 0, -1) if n % m == 0]


MEMORY_ROWS = 8  # rows per micro-batch of the memory profile (with offloading; measured in bench/RESULTS.md)


@dataclass
class Plan:
    profile: str
    micro_batch: int
    accumulation: int
    checkpointing: bool
    offload: bool = False  # checkpointed layer inputs in pinned host memory


def plan(cfg: RunConfig, profile: str, free_bytes: int | None = None, micro_batch: int | None = None,
         accumulation: int | None = None, offload: bool = True) -> Plan:
    """Micro-batch split and checkpointing for a profile; the effective batch (micro_batch x accumulation, per
    process: the config's unless given) never changes. offload=False: the memory profile without offloading keeps
    the config's split."""
    mb0 = micro_batch or cfg.per_device_train_batch_size
    ga0 = accumulation or cfg.gradient_accumulation_steps
    if profile == "speed":
        if free_bytes is None:
            import torch
            free_bytes = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
        mb = micro_batch_for(cfg, free_bytes, mb0 * ga0)
        if not mb:  # nothing fits without checkpointing (or no GPU): keep the split and the checkpointing
            return Plan(profile, mb0, ga0, cfg.gradient_checkpointing)
        return Plan(profile, mb, mb0 * ga0 // mb, False)
    if profile == "memory":
        if not offload:
            return Plan(profile, mb0, ga0, True)
        mb = next(m for m in _divisors(mb0 * ga0) if m <= MEMORY_ROWS)
        return Plan(profile, mb, mb0 * ga0 // mb, True, offload=True)
    return Plan(profile, mb0, ga0, cfg.gradient_checkpointing)


# ------------------------------------------------------------------------------------------ applying a profile
PARTS = ("split", "padding_free", "attention", "norms", "lora", "optim")
PROFILE_PARTS = {"speed": PARTS,
                 "memory": ("split", "padding_free", "attention", "norms", "lora", "head_chunks", "offload")}
HEAD_CHUNK = 8192  # vocabulary columns per tile of TRL's fused LM head in the memory profile (TRL: 32768)


def apply_profile(cfg: RunConfig, model, args, tokenizer=None, profile: str | None = None,
                  free_bytes: int | None = None, parts=None):
    """Model-level and SFTConfig-level changes of a profile. `args` is an SFTConfig or a dict of its keyword
    arguments. Returns (model, args, trainer_kwargs); trainer_kwargs go to SFTTrainer (the padding-free collator).
    reference: nothing changes. `parts` (for the benchmark and the tests) picks a subset of the changes; add
    "bf16_residual" to keep the residual stream in the compute dtype too (halves checkpoint memory)."""
    profile = profile or resolve_profile(cfg, free_bytes)
    if profile not in PROFILES:
        raise UserError(f"profile={profile} is not one of auto, {', '.join(PROFILES)}")
    get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
    if profile == "reference":
        if get("packing"):  # a fix, not a speed-up: stock Falcon in transformers 5.17 does not pass position_ids
            patch_falcon_attention(model)  # to its mask, so packed rows attend to each other (5.24 does)
        return model, args, {}
    parts = PROFILE_PARTS[profile] if parts is None else tuple(parts)
    changes = {}
    offload = "offload" in parts
    if "split" in parts:
        p = plan(cfg, profile, free_bytes, get("per_device_train_batch_size"), get("gradient_accumulation_steps"),
                 offload=offload)
        changes = dict(per_device_train_batch_size=p.micro_batch, gradient_accumulation_steps=p.accumulation,
                       gradient_checkpointing=p.checkpointing, activation_checkpointing=p.checkpointing)
        if not p.checkpointing and hasattr(model, "disable_input_require_grads"):
            try:  # only checkpointing needs the embedding output to require grad; it costs layer 0's input grad
                model.disable_input_require_grads()
            except AttributeError:
                pass
    if "optim" in parts and getattr(get("optim"), "value", get("optim")) == "paged_adamw_32bit" and _cuda():
        changes["optim"] = _optim_name("adamw_torch_fused", isinstance(args, dict))
    if offload and (changes.get("gradient_checkpointing") if "split" in parts else get("gradient_checkpointing")):
        # reentrant checkpointing saves each layer's input through autograd's saved-tensor hooks (offload.py);
        # the non-reentrant kind keeps it in a closure, out of the hooks' reach
        kw = {**(get("gradient_checkpointing_kwargs") or {}), "use_reentrant": True}
        changes.update(gradient_checkpointing_kwargs=kw, activation_checkpointing_kwargs=kw)
        from .offload import offload_layer_inputs
        offload_layer_inputs(model)
    if isinstance(args, dict):
        args = {**args, **{k: v for k, v in changes.items() if not k.startswith("activation_")}}
    else:
        for k, v in changes.items():
            # transformers >= 5.20 reads activation_checkpointing*; gradient_checkpointing* are aliases resolved
            # only when the arguments are built, so both names are set
            if not k.startswith("activation_") or hasattr(args, k):
                setattr(args, k, v)
    if "attention" in parts:
        patch_falcon_attention(model)
    if "norms" in parts and (get("bf16") or get("fp16")):
        norms_in_compute_dtype(model, residual_fp32="bf16_residual" not in parts)
    if "lora" in parts:
        patch_lora_forward(model)
    if "head_chunks" in parts:
        _set_head_chunk(HEAD_CHUNK)
    trainer_kwargs = {}
    if "padding_free" in parts and not get("packing"):
        trainer_kwargs["data_collator"] = padding_free_collator(tokenizer, cfg)
    print(f"profile {profile}: micro-batch {get('per_device_train_batch_size')} x "
          f"{get('gradient_accumulation_steps')} accumulation, checkpointing "
          f"{'on' if get('gradient_checkpointing') else 'off'}, {', '.join(parts)}")
    return model, args, trainer_kwargs


_HEAD_CHUNK_DEFAULT: list = []


def _set_head_chunk(n: int | None) -> None:
    """TRL's fused LM head projects tiles of (4096 tokens x chunk vocabulary columns); smaller tiles, less peak."""
    try:
        import trl.trainer.utils as tu
    except ImportError:
        return
    if not _HEAD_CHUNK_DEFAULT:
        _HEAD_CHUNK_DEFAULT.append(tu._CHUNKED_LOGPROB_CHUNK_SIZE)
    tu._CHUNKED_LOGPROB_CHUNK_SIZE = n or _HEAD_CHUNK_DEFAULT[0]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _optim_name(name: str, as_str: bool):
    """The same AdamW (fp32 states, same hyper-parameters) as one fused multi-tensor kernel instead of one
    bitsandbytes kernel per LoRA tensor on paged (unified) memory."""
    if as_str:
        return name
    from transformers.training_args import OptimizerNames
    return OptimizerNames(name)


def padding_free_collator(tokenizer, cfg: RunConfig):
    """TRL's collator in padding-free mode: the micro-batch's rows end to end with position_ids restarting at 0,
    labels -100 on each row's first token. TRL still truncates rows to max_length when it prepares the dataset
    (it refuses padding_free=True with max_length unless packing, hence the collator is passed in)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else \
        (tokenizer.eos_token_id if tokenizer is not None else 0)
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)


def remove_profile(model) -> None:
    """Undo every patch of apply_profile (the benchmark reuses one base model)."""
    from .offload import remove_offload
    if _HEAD_CHUNK_DEFAULT:
        _set_head_chunk(None)
    remove_offload(model)
    for m in unwrap(model).modules():
        if hasattr(m, "_fq_hook"):
            m._fq_hook.remove()
            del m._fq_hook
        if "forward" in m.__dict__ and getattr(m.forward, "_fq_patched", False):
            del m.forward
