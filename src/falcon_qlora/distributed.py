"""Several processes (accelerate launch / torchrun): who is who, what the effective batch holds fixed, who writes.

    accelerate launch --config_file "$(python -m falcon_qlora.distributed ddp)" -m falcon_qlora.cli train ...
    accelerate launch --config_file "$(python -m falcon_qlora.distributed fsdp_qlora)" -m falcon_qlora.cli train ...
    torchrun --nproc_per_node 2 -m falcon_qlora.cli train ...

accelerate and torch.distributed do the work; this module only reads their environment (WORLD_SIZE, RANK,
LOCAL_RANK, ACCELERATE_USE_FSDP), splits the batch among processes, and keeps file writes on the main process.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .config import ConfigError, RunConfig
from .errors import UserError

CONFIG_DIR = Path(__file__).parent / "accelerate_configs"
RECORD_ENV = "FALCON_QLORA_RECORD_ROWS"  # debug: a folder where each process writes the rows it trained on


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Only this process logs, writes the run config/metrics/plot and saves the final adapter."""
    return rank() == 0


def fsdp_enabled() -> bool:
    """accelerate launch sets ACCELERATE_USE_FSDP from an FSDP config file (fsdp_qlora.yaml). The one reader of it:
    the plan (profiles), the 4-bit storage dtype (model) and the fp16 check below ask here."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def config_path(name: str) -> Path:
    """Path of a shipped accelerate config: 'ddp' or 'fsdp_qlora'."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"no accelerate config named '{name}' (shipped: {names})")
    return path


def init() -> None:
    """Join the process group early (before the Trainer does), so the output dir can be prepared by the main
    process alone. Without a GPU, accelerate needs cpu=True to see a torchrun launch as distributed (gloo)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState
        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def split_batch(cfg: RunConfig, processes: int | None = None) -> tuple[int, int]:
    """(per-device batch, accumulation) that each process runs so that batch_policy holds (plan.make_plan then
    splits those rows into micro-batches as the profile wants).

    effective: per_device_train_batch_size x gradient_accumulation_steps, as written for one process, stays the rows
    per optimizer step; the accumulation is divided among processes, and only if it does not divide, the per-device
    batch is lowered (never raised, so memory per GPU never grows). per_device: both stay; the effective batch is
    multiplied by the process count (lr and max_steps then see a bigger batch).
    """
    n = processes or world_size()
    bs, acc = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    if cfg.batch_policy == "per_device" or n == 1:
        return bs, acc
    if acc % n == 0:
        return bs, acc // n
    target = bs * acc
    if target % n:
        raise ConfigError(f"batch_policy=effective: the effective batch {target} (per_device_train_batch_size {bs} x "
                          f"gradient_accumulation_steps {acc}) does not divide among {n} processes; choose a "
                          f"gradient_accumulation_steps that does, or set batch_policy=per_device")
    rows = target // n  # rows each process contributes per step
    per_device = max(d for d in range(1, bs + 1) if rows % d == 0)
    return per_device, rows // per_device


def trainer_kwargs(plan) -> dict:
    """SFTConfig arguments of a RunPlan's split, and what several processes need."""
    import torch
    kw = dict(per_device_train_batch_size=plan.micro_batch, gradient_accumulation_steps=plan.accumulation)
    if plan.processes > 1:
        # Every LoRA weight is used in every forward: DDP need not search for unused ones (it also breaks
        # with reentrant gradient checkpointing when it does).
        kw["ddp_find_unused_parameters"] = False
        if not torch.cuda.is_available():
            kw["use_cpu"] = True  # accelerate treats a torchrun launch without GPUs as distributed only with this
    return kw


def check_fsdp(compute_dtype) -> None:
    """FSDP flattens each decoder layer's weights into one tensor, so they need one dtype: the 4-bit weights are
    stored in the compute dtype (model._quant_storage); fp16 keeps layer norms in fp32, which breaks that."""
    import torch
    if fsdp_enabled() and compute_dtype == torch.float16:
        raise UserError("FSDP-QLoRA needs compute_dtype=bf16 (or fp32): fp16 keeps Falcon's layer norms in fp32, "
                        "which FSDP cannot shard together with fp16-stored 4-bit weights. Use the DDP config on "
                        "GPUs without bf16 (T4, V100)")


def save_adapter(trainer, folder) -> None:
    """Write the adapter into folder. Under FSDP, Trainer.save_model wrote an adapter with no tensors (measured on
    the H200 at Falcon-40B's shape), so gather the full LoRA weights onto the main process ourselves and save those
    through peft; every process must call this (the gather is collective)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(folder))
        return
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = peft_model.active_adapter
    state = {}
    with FSDP.summon_full_params(trainer.model, writeback=False, rank0_only=True):
        if is_main():
            for name, p in trainer.model.named_parameters():
                if "lora_" in name:
                    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
                        name = name.replace(wrapper, "")
                    state[name.replace(f".{adapter}.", ".")] = p.detach().float().cpu().clone()
    if is_main():
        if not state:
            raise RuntimeError("FSDP gathered no LoRA weights: the adapter would be empty")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_model.peft_config[adapter].save_pretrained(str(folder))


def record_rows(trainer) -> None:
    """Debug aid (FALCON_QLORA_RECORD_ROWS=DIR): each process writes the token ids of every training micro-batch
    it computes a loss on (rows-rank<R>.jsonl, with the step), and its LoRA weights at the end
    (adapter-rank<R>.safetensors). Shows which rows each rank saw and that the ranks ended in agreement."""
    folder = os.environ.get(RECORD_ENV)
    if not folder:
        return
    from transformers import TrainerCallback
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows_file = folder / f"rows-rank{rank()}.jsonl"
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            ids = inputs["input_ids"].tolist()
            with rows_file.open("a") as f:
                f.write(json.dumps({"rank": rank(), "step": trainer.state.global_step + 1, "input_ids": ids}) + "\n")
        return original(model, inputs, *args, **kwargs)

    class SaveAdapterPerRank(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            from peft import get_peft_model_state_dict
            from safetensors.torch import save_file
            weights = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(weights, str(folder / f"adapter-rank{rank()}.safetensors"))

    trainer.compute_loss = compute_loss
    trainer.add_callback(SaveAdapterPerRank())


def main(argv: list[str] | None = None) -> int:
    """`python -m falcon_qlora.distributed NAME` prints the path of a shipped accelerate config."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        names = " | ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        print(f"usage: python -m falcon_qlora.distributed {{{names}}}   (prints the accelerate config's path)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(config_path(argv[0]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
