"""Speed and memory profiles: the same training as the reference recipe, computed faster or in less memory.

    plan = make_plan(cfg)                                            # plan.py decides: auto -> speed | memory | reference
    model, args, trainer_kwargs = apply_profile(model, args, plan, tokenizer)    # args: SFTConfig

This module applies a RunPlan; plan.py owns every decision (profile, split, optimizer, parts) and memory.py costs it.
What a profile changes (each measured in bench/NOTES.md; none changes what is learned; the patched forwards live
in fast_paths.py, the offloading in offload.py):
  - padding-free batches: the rows of a micro-batch are laid end to end in one sequence, so no compute is spent on
    padding; the loss is still the mean over the same real tokens of the same rows.
  - Falcon attention through SDPA's fused kernels, one causal block per row (no attention across rows), instead of
    the materialised (rows, 71, L, L) mask and fp32 softmax that the stock code falls back to.
  - layer-norm outputs in the compute dtype: under autocast they come out in fp32 and drag every activation after
    them (the 18176-wide MLP ones too) into fp32; the residual stream itself stays fp32, as in the reference.
  - each LoRA layer as one GEMM: addmm(result, A(dropout(x)), B^T, alpha=scale) instead of peft's clone/mul/add.
  - weight_cache: the frozen 4-bit weights dequantized once to the compute dtype, where the GPU has room for them.
  - compile: each decoder layer through torch.compile, which fuses the element-wise work between the GEMMs.
  - speed: no gradient checkpointing, the effective batch in as few micro-batches as free memory allows (costed by
    memory.py for the model's own shape), fused torch AdamW instead of paged bnb AdamW 32-bit.
  - memory: gradient checkpointing kept, its layer inputs in pinned host memory (offload.py), so micro-batches of up
    to plan.MEMORY_ROWS rows fit in the reference's memory; narrower tiles in TRL's fused LM head; LoRA dropout
    masks kept for backward as bits in compiled layers; the reference's paged AdamW as one fused kernel
    (optimizer.PagedAdamW: moments in unified memory, as bitsandbytes keeps them).
Generation, eval of padded batches and non-Falcon models fall through to the stock code paths.
"""
from __future__ import annotations

from .fast_paths import (cache_dequantized_weights, compile_layers, norms_in_compute_dtype, pack_dropout_masks,
                         patch_falcon_attention, patch_lora_forward, unwrap)
from .plan import PAGED_FUSED_ADAM


def apply_profile(model, args, plan, tokenizer=None):
    """Model-level and SFTConfig-level changes of a RunPlan (plan.make_plan). `args` is an SFTConfig or a dict of its
    keyword arguments. Returns (model, args, trainer_kwargs); trainer_kwargs go to SFTTrainer (the padding-free
    collator). reference: nothing changes."""
    get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
    if plan.profile == "reference":
        if get("packing"):  # a fix, not a speed-up: stock Falcon in transformers 5.17 does not pass position_ids
            patch_falcon_attention(model)  # to its mask, so packed rows attend to each other (5.24 does)
        return model, args, {}
    parts = plan.parts
    changes = dict(per_device_train_batch_size=plan.micro_batch, gradient_accumulation_steps=plan.accumulation,
                   gradient_checkpointing=plan.checkpointing, activation_checkpointing=plan.checkpointing)
    if not plan.checkpointing and hasattr(model, "disable_input_require_grads"):
        try:  # only checkpointing needs the embedding output to require grad; it costs layer 0's input grad
            model.disable_input_require_grads()
        except AttributeError:
            pass
    trainer_kwargs = {}
    if plan.optim == PAGED_FUSED_ADAM:  # Trainer builds it: TrainingArguments knows no such name, so the nearest
        from .optimizer import PagedAdamW
        changes["optim"] = _optim_name("adamw_torch_fused", isinstance(args, dict))
        trainer_kwargs["optimizer_cls_and_kwargs"] = (PagedAdamW, dict(
            lr=get("learning_rate", 5e-5), betas=(get("adam_beta1", 0.9), get("adam_beta2", 0.999)),
            eps=get("adam_epsilon", 1e-8)))  # weight decay: Trainer's parameter groups set it, as for any optimizer
    elif plan.optim != getattr(get("optim"), "value", get("optim")):
        changes["optim"] = _optim_name(plan.optim, isinstance(args, dict))
    if plan.offload:
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
    if plan.norms:
        norms_in_compute_dtype(model, residual_fp32="bf16_residual" not in parts)
    if "lora" in parts:
        patch_lora_forward(model)
    if "weight_cache" in parts:
        cache_dequantized_weights(model)
    if "packed_masks" in parts:
        pack_dropout_masks(model)
    if "compile" in parts:
        compile_layers(model, plan.checkpointing)
    if plan.head_chunk:
        _set_head_chunk(plan.head_chunk)
    if plan.padding_free:
        trainer_kwargs["data_collator"] = padding_free_collator(tokenizer)
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


def _optim_name(name: str, as_str: bool):
    """The same AdamW (fp32 states, same hyper-parameters) as one fused multi-tensor kernel instead of one
    bitsandbytes kernel per LoRA tensor on paged (unified) memory."""
    if as_str:
        return name
    from transformers.training_args import OptimizerNames
    return OptimizerNames(name)


def padding_free_collator(tokenizer):
    """TRL's collator in padding-free mode: the micro-batch's rows end to end with position_ids restarting at 0,
    labels -100 on each row's first token. TRL still truncates rows to max_length when it prepares the dataset
    (it refuses padding_free=True with max_length unless packing, hence the collator is passed in)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else \
        (tokenizer.eos_token_id if tokenizer is not None else 0)
    return DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)


def remove_profile(model) -> None:
    """Undo every patch of apply_profile (the benchmark reuses one base model)."""
    from .fast_paths import drop_weight_cache, uncompile_layers, unpack_dropout_masks
    from .offload import remove_offload
    if _HEAD_CHUNK_DEFAULT:
        _set_head_chunk(None)
    remove_offload(model)
    unpack_dropout_masks(model)
    uncompile_layers(model)
    drop_weight_cache(model)
    for m in unwrap(model).modules():
        if hasattr(m, "_fq_hook"):
            m._fq_hook.remove()
            del m._fq_hook
        if "forward" in m.__dict__ and getattr(m.forward, "_fq_patched", False):
            del m.forward
