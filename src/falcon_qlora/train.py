"""Train stage: the run config -> TRL's SFTTrainer -> an adapter in <output_dir>/final.

    falcon-qlora train                                   # the reference recipe (needs a CUDA GPU and the hub)
    falcon-qlora train --config demo --max_steps 20      # a preset or YAML file, then any key overridden
    python -c "from falcon_qlora.train import train; from falcon_qlora.config import load_config; \
               train(load_config('demo'))"

Data is validated before the model is loaded; checkpoints and the final folder hold only the adapter, the tokenizer
and the run config.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import distributed as dist
from .config import RunConfig, check_runtime, parse_args
from .errors import UserError
from .rundir import CHECKPOINT, FINAL, RunDir, save_run_config


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    metrics: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)
    model: object = field(default=None, repr=False)  # the trained PeftModel, for generating right away
    tokenizer: object = field(default=None, repr=False)


def check_device(cfg: RunConfig) -> None:
    """Without a CUDA GPU only small local models make sense; say so in one line instead of failing deep inside."""
    import torch
    from .model import MODEL_ALIASES, is_local_model, resolve_model_path
    name = cfg.model_name_or_path
    if name in MODEL_ALIASES:  # the built-in models are small enough for a CPU
        return
    resolve_model_path(name)  # a missing local path: say that, not "no GPU"
    if torch.cuda.is_available():
        return
    size = sum(p.stat().st_size for p in Path(name).glob("*.safetensors")) if is_local_model(name) else None
    if size is None or size > 3e9:
        raise UserError(f"no CUDA GPU found: training {name} needs one (on a CPU it would take days). "
                        "Try the offline demo instead: falcon-qlora demo")


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (see checkpoints.is_complete)."""
    from .checkpoints import complete_checkpoints
    return complete_checkpoints(out)


def prepare_output_dir(cfg: RunConfig) -> Path:
    """Refuse to mix runs: an output dir with checkpoints needs --resume (continue) or --overwrite (start over).
    With --resume, damaged checkpoints are set aside here, before anything is loaded (checkpoints.verify)."""
    import tempfile
    from .checkpoints import checkpoint_dirs, clean_leftovers, remove, set_aside_damaged
    from .guards import check_output_paths
    out = Path(cfg.output_dir)
    if out.is_dir():
        check_output_paths(out)  # e.g. a `final` symlink that points elsewhere
        if dist.is_main():
            clean_leftovers(out)  # staging folders of a killed run
    existing = checkpoint_dirs(out)
    if existing and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already holds checkpoints ({existing[-1].name}): pass --resume to continue that run, "
                        "--overwrite to start over, or choose another --output_dir")
    if existing and cfg.overwrite and dist.is_main():
        for p in out.glob(f"{CHECKPOINT}*"):  # checkpoint-N.damaged ones too
            remove(p)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)  # a new name: never follows a planted link
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"output_dir {out} is not writable ({err.strerror}): choose another --output_dir") from None
    if cfg.resume and dist.is_main():
        for note in set_aside_damaged(out, cfg):
            print(f"falcon-qlora: {note}", file=sys.stderr, flush=True)
    return out


def _netrc_has(host: str) -> bool:
    import netrc
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


_WANDB_DIR_SET = []  # the WANDB_DIR values set here (a value the user set is left alone)
WANDB_PROBE_SECONDS = 3.0


def wandb_env(cfg: RunConfig) -> None:
    """W&B writes under output_dir (WANDB_DIR, unless you set it), and never hangs on a login prompt or a network
    that is not there: without credentials, or when the service does not answer within a few seconds, it logs
    offline (one line says so and how to upload later)."""
    if os.environ.get("WANDB_DIR") in (None, *_WANDB_DIR_SET):
        os.environ["WANDB_DIR"] = str(Path(cfg.output_dir).resolve())
        _WANDB_DIR_SET.append(os.environ["WANDB_DIR"])
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")):
        os.environ["WANDB_MODE"] = "offline"  # no credentials: log locally, never prompt for a login
        return
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    problem = _unreachable(url, WANDB_PROBE_SECONDS)
    if problem and dist.is_main():
        print(f"falcon-qlora: W&B at {url} {problem}: logging offline into {os.environ['WANDB_DIR']}/wandb; upload "
              f"later with: wandb sync {os.environ['WANDB_DIR']}/wandb/offline-run-*", file=sys.stderr, flush=True)
    if problem:
        os.environ["WANDB_MODE"] = "offline"


def _unreachable(url: str, seconds: float) -> str | None:
    """Why a TCP connection to `url`'s host cannot be made within `seconds` (name lookup included), or None."""
    import socket
    import threading
    from urllib.parse import urlparse
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    result = []

    def connect():
        try:
            socket.create_connection((u.hostname, port), timeout=seconds).close()
            result.append(None)
        except OSError as err:
            result.append(f"is unreachable ({err.strerror or err})")
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(seconds)
    return result[0] if result else f"did not answer within {seconds:g} s"


NON_BLOCKING_INPUTS = True  # False: transformers' default blocking copy of each batch (for the bench)


def sft_config(cfg: RunConfig, tokenizer, compute_dtype, plan=None):
    """Our config and its RunPlan (default plan.make_plan(cfg)) -> TRL's SFTConfig (one place that knows the
    mapping)."""
    import torch
    from trl import SFTConfig
    if cfg.report_to != "none":
        import importlib.util
        if importlib.util.find_spec(cfg.report_to) is None:
            raise UserError(f"report_to={cfg.report_to} needs the {cfg.report_to} package: pip install "
                            f"{cfg.report_to}, or set report_to=none")
    if cfg.report_to == "wandb":
        wandb_env(cfg)
    eval_on = cfg.eval_split is not None and cfg.eval_steps is not None
    from .plan import make_plan
    placement = dist.trainer_kwargs(plan or make_plan(cfg))
    cuda = torch.cuda.is_available()
    if compute_dtype == torch.bfloat16 and not cuda:
        placement["use_cpu"] = True  # bf16 on a CPU that has it (transformers refuses bf16 without a GPU otherwise)
    # Batches from pinned memory, copied to the GPU without waiting: a blocking copy makes the host wait at every
    # step until the GPU has finished the previous one, and the GPU then waits while the host collates the next
    # batch and queues its kernels (bench/NOTES.md).
    placement.update(dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda and NON_BLOCKING_INPUTS})
    return SFTConfig(
        output_dir=cfg.output_dir, **placement,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size, optim=cfg.optim,
        learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a share of max_steps
        lr_scheduler_type=cfg.lr_scheduler_type, weight_decay=cfg.weight_decay,
        gradient_checkpointing=cfg.gradient_checkpointing, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, logging_steps=cfg.logging_steps, seed=cfg.seed,
        eval_strategy="steps" if eval_on else "no", eval_steps=cfg.eval_steps, report_to=cfg.report_to,
        bf16=compute_dtype == torch.bfloat16, fp16=compute_dtype == torch.float16,
        max_length=cfg.max_length, dataset_text_field=cfg.dataset_text_field, packing=cfg.packing,
        completion_only_loss=cfg.completion_only_loss, pad_token=tokenizer.pad_token,
        eos_token=tokenizer.eos_token, disable_tqdm=cfg.disable_tqdm, logging_first_step=True,
    )


def build_trainer(cfg: RunConfig, model, tokenizer, train_ds, eval_ds, callbacks=(), plan=None):
    """SFTTrainer for the run, computed as `plan` says (default plan.make_plan(cfg))."""
    import torch
    from trl import SFTTrainer
    from .model import resolve_compute_dtype
    from .safety import safe_trainer_class
    from .profiles import apply_profile
    from .throughput import Meter
    from .data import for_trainer
    from .plan import make_plan
    plan = plan or make_plan(cfg)
    args = sft_config(cfg, tokenizer, resolve_compute_dtype(cfg), plan)
    train_ds, eval_ds = for_trainer(train_ds, tokenizer, cfg), for_trainer(eval_ds, tokenizer, cfg)
    # speed/memory profile: micro-batch split, checkpointing, padding-free rows, fused paths (profiles.py)
    model, args, profile_kwargs = apply_profile(model, args, plan, tokenizer)
    # SFTTrainer + atomic checkpoints, a stop on NaN/inf, no tokens in training_args.bin (safety.py)
    trainer = safe_trainer_class(SFTTrainer)(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                             processing_class=tokenizer, callbacks=list(callbacks),
                                             **profile_kwargs)
    # TRL casts the LoRA weights of a quantized model to bf16. Keep them in fp32 instead: they are the master
    # weights (an lr of 2e-4 update is below bf16's resolution for most entries), and on a CPU fp32 is ~9x faster.
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainer.run_config, trainer.plan = cfg, plan
    trainer.meter = Meter(trainer, cfg.lora_r, cfg.max_length)  # tokens/s, peak GPU memory, MFU in every loss log
    return trainer


def write_metrics(out: Path, log_history: list) -> Path:
    path = RunDir(out).metrics
    path.write_text("".join(json.dumps(x) + "\n" for x in log_history), encoding="utf-8")
    return path


def plot_losses(path: Path, log_history: list, heldout: tuple[float, float] | None = None,
                title: str | None = None) -> Path | None:
    """The trainer's loss curve (and its held-out evals) into `path`; `heldout` adds a loss measured before and
    after training as two points (the demo's). None when the history has no training loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(x["step"], x["loss"]) for x in log_history if "loss" in x]
    held = [(x["step"], x["eval_loss"]) for x in log_history if "eval_loss" in x]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    if heldout:
        ax.plot([0, train[-1][0]], list(heldout), "o", color="tab:orange", label="held-out loss (before, after)")
    ax.set(xlabel="optimizer step", ylabel="loss (mean per token)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train(cfg: RunConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None) -> TrainResult:
    """Run one training job. model/tokenizer/datasets may be passed in (the notebook does); otherwise they are
    loaded from the config. Returns where things were written and the final metrics."""
    from transformers.trainer_utils import set_seed
    from . import data as D
    from .model import (attach_lora, check_targets_early, check_trainable_layout, count_linear4bit, load_base_model,
                        load_tokenizer, resolve_compute_dtype, save_fingerprint, trainable_summary)
    from .checkpoints import StopOnSignal
    from .throughput import summary as throughput_summary
    from .guards import check_bitsandbytes, check_disk, inside
    started = time.perf_counter()
    check_device(cfg)
    dist.init()  # several processes: join the group now, so that only the main one writes
    dist.check_fsdp(resolve_compute_dtype(cfg))
    check_runtime(cfg)  # optimizer/schedule names, bf16 on a CPU: before anything is written
    if cfg.load_in_4bit and model is None:
        check_bitsandbytes()  # a broken install fails here, in one line, not deep inside the model load
    tok = tokenizer or load_tokenizer(cfg.model_name_or_path, cfg)
    # Rows validated and rendered in the run's chat template (set on tok, saved with it) before any model is
    # loaded or anything is written.
    train_ds, eval_ds = D.load_dataset_splits(cfg, train_dataset, eval_dataset, tokenizer=tok)
    check_targets_early(cfg, model)  # a lora_target_modules typo, before the run config is written
    out = prepare_output_dir(cfg)
    dist.barrier()
    if dist.is_main():  # before any model loads, so that a run killed while loading can be resumed
        save_run_config(cfg, out)
    if dist.is_main():
        D.summarize(train_ds, tok, cfg, "train")
    set_seed(cfg.seed)  # LoRA init is part of the run's randomness
    from .plan import make_plan
    plan = make_plan(cfg)  # before the model loads: the free GPU memory it plans with still includes the weights
    if model is None:
        model = load_base_model(cfg)
    if not hasattr(model, "peft_config"):
        model = attach_lora(model, cfg)
    check_trainable_layout(model, "training")  # a model passed in may have been repacked by an earlier eval
    if dist.is_main():
        save_fingerprint(cfg.model_name_or_path, out)  # chat/eval/merge check the base against it
        four_bit = f"{count_linear4bit(model)} bnb Linear4bit layers; " if cfg.load_in_4bit else ""
        print(f"{four_bit}{trainable_summary(model)}; {plan.describe()}; up to {plan.effective * cfg.max_length:,} "
              "tokens per step")
    check_disk(cfg, model)  # the checkpoints kept under save_total_limit must fit on the disk
    stop = StopOnSignal()  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, print how to resume
    trainer = build_trainer(cfg, model, tok, train_ds, eval_ds, callbacks=[stop.callback], plan=plan)
    trainer.meter.started = started
    dist.record_rows(trainer)
    resume = None
    if cfg.resume:
        found = checkpoints(out)
        resume = str(found[-1]) if found else None
        if dist.is_main():
            print(f"resuming from {resume}" if resume else f"no checkpoint in {out}: starting from step 0")
    stop.train(trainer, resume)  # trainer.train(), saving and stopping on Ctrl-C / SIGTERM
    stop.report(trainer, cfg)
    metrics = {"train_steps": trainer.state.global_step, **plan.as_metrics()}
    speed = throughput_summary(trainer.state.log_history)
    if speed and dist.is_main():
        print(speed)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    final = inside(out, FINAL)
    history = trainer.state.log_history
    with stop.finishing(final, show=dist.is_main()):  # a SIGTERM now lets these few seconds of writing finish
        save_final(trainer, tok, cfg, out, final, [{"plan": plan.as_metrics()}, *history])  # what ran, first
    dist.barrier()  # no process returns before the final folder is complete
    if cfg.push_to_hub and dist.is_main():
        from .publish import publish as push  # not checkpoints.publish, which moved final/ into place above
        push(final, cfg.push_to_hub, cfg)  # after everything is saved: an offline failure loses nothing
    from .profiles import remove_profile
    remove_profile(trainer.model)  # the returned model generates with the stock forward, outside autocast
    return TrainResult(output_dir=out, final_dir=final, metrics=metrics, log_history=history, model=trainer.model,
                       tokenizer=tok)


def save_final(trainer, tok, cfg: RunConfig, out: Path, final: Path, history: list) -> None:
    """final/ (adapter, tokenizer, run files) through a staging folder, then metrics.jsonl and loss.png. A full disk
    ends in one line naming the last good checkpoint and the resume command."""
    import contextlib
    from .checkpoints import DISK_FULL, atomic_dir, disk_full
    from .rundir import copy_run_files, staging_of
    try:  # final/ appears complete or not at all; only the main process writes
        with atomic_dir(final) if dist.is_main() else contextlib.nullcontext(staging_of(final)) as staging:
            dist.barrier()
            dist.save_adapter(trainer, staging)  # every process calls it (FSDP gathers)
            if not dist.is_main():
                return
            tok.save_pretrained(staging)
            copy_run_files(out, staging)
        write_metrics(out, history)
        plot = plot_losses(RunDir(out).loss_plot, history)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        raise disk_full(cfg, out, "writing the final adapter") from None
    print(f"adapter saved to {final}" + (f"; loss curve {plot}" if plot else ""))


def cli(argv: list[str]) -> int:
    cfg = parse_args(argv)
    result = train(cfg)
    if dist.is_main():
        print(json.dumps({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}), file=sys.stdout)
    return 0
