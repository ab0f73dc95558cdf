"""The trainer falcon-qlora runs: TRL's SFTTrainer plus three small overrides (atomic checkpoints, a stop on a NaN/inf
loss or gradient norm before any checkpoint holds its result or on a diverged loss, no credentials in what it saves).
Checks made while training runs go here; checks before it starts go in guards.py.

    trainer = safe_trainer_class(SFTTrainer)(model=..., args=..., callbacks=[stop.callback])
    stop.train(trainer, resume)                  # stop = StopOnSignal(): trainer.train() with Ctrl-C/SIGTERM caught
    stop.report(trainer, cfg)                    # stopped by a signal: print the resume command
"""
from __future__ import annotations

import gc
import math
import os
from pathlib import Path

from .checkpoints import StopOnSignal, save_checkpoint_atomically
from .errors import UserError

# Environment variables whose values must never reach a file of the run directory.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY", "HF_API_TOKEN")


def scrub_args(args) -> None:
    """training_args.bin is the pickled TrainingArguments: keep tokens out of it. Uploads read HF_TOKEN from the
    environment (huggingface_hub does), so nothing needs the token stored in the arguments."""
    for name in [n for n in vars(args) if n.endswith("_token") and n.startswith("hub")]:
        setattr(args, name, None)


def secret_values(environ=None) -> list[str]:
    """Values of credential-like environment variables (long enough not to match by accident)."""
    env = os.environ if environ is None else environ
    names = set(SECRET_ENV) | {k for k in env if k.endswith(("_TOKEN", "_API_KEY", "_SECRET"))}
    return sorted({env[k] for k in names if len(env.get(k) or "") >= 8})


def files_with_secrets(run_dir: Path, secrets: list[str]) -> list[Path]:
    """Every file under run_dir whose bytes contain one of `secrets` (raw, as in a pickle, or UTF-16)."""
    needles = [s.encode() for s in secrets] + [s.encode("utf-16-le") for s in secrets]
    return [p for p in sorted(Path(run_dir).rglob("*")) if p.is_file()
            and any(n in p.read_bytes() for n in needles)]


class NonFiniteError(UserError):
    """A NaN or inf loss or gradient norm: training stops at that step, before any checkpoint holds its result."""


def _value(x) -> float:
    return float(x.detach().float().item() if hasattr(x, "detach") else x)


DIVERGENCE_STEPS = 5  # optimizer steps in a row above divergence_factor x the first step's loss


class DivergenceError(UserError):
    """The training loss stayed far above where it started: the run is learning nothing useful."""


class DivergenceWatch:
    """Follows the mean training loss of each optimizer step and stops a run whose loss stays above `factor` times
    its first step's for DIVERGENCE_STEPS steps in a row. Calibration: every benchmark and demo run so far ends at
    or below its first loss (max/first = 1.00 over 40 H200 runs in bench/raw); the broken CPU demo that prompted
    this rose 4.6x on held-out rows. A factor of 2 leaves room for noisy starts while still catching that."""

    def __init__(self, factor: float):
        self.factor, self.first, self.above = factor, None, 0
        self.step, self.losses = None, []

    def add(self, step: int, loss: float, trainer, cfg) -> None:
        """One micro-batch's loss; a step's mean is judged once the next step begins (or at flush())."""
        if self.step is not None and step != self.step:
            self.flush(trainer, cfg)
        self.step = step
        self.losses.append(loss)

    def flush(self, trainer, cfg) -> None:
        if not self.losses:
            return
        mean, step = sum(self.losses) / len(self.losses), self.step
        self.losses = []
        if self.first is None:
            self.first = mean
            return
        self.above = self.above + 1 if mean > self.factor * self.first else 0
        if self.above >= DIVERGENCE_STEPS:
            from .checkpoints import standing
            raise DivergenceError(
                f"training stopped at step {step}: the loss has stayed above {self.factor:g}x its first value "
                f"({mean:.3g} vs {self.first:.3g}) for {DIVERGENCE_STEPS} steps: training diverged; "
                f"{'; '.join(standing(Path(trainer.args.output_dir), cfg))}. Likely causes: learning_rate too high "
                f"(now {trainer.args.learning_rate:g}), broken 4-bit kernels on this machine (run falcon-qlora "
                "doctor), or bad rows. Set divergence_factor=None to train on regardless")


def check_finite(what: str, value, trainer, cfg=None, step: int | None = None) -> None:
    """Raise NonFiniteError naming the step, the last good checkpoint and the likely fix if `value` is NaN/inf.

    Under fp16 the grad scaler produces inf gradient norms on purpose while it searches for a scale, and skips
    those steps; that is tolerated until the scale falls below 1 (overflow at every scale: a real divergence)."""
    if value is None or math.isfinite(v := _value(value)):
        return
    scaler = getattr(trainer.accelerator, "scaler", None)
    if what == "grad_norm" and scaler is not None and scaler.get_scale() >= 1.0:
        return
    from .checkpoints import standing
    args = trainer.args
    step = trainer.state.global_step + 1 if step is None else step  # default: the step being computed
    last, then = standing(Path(args.output_dir), cfg)
    if args.fp16:
        fix = ("fp16 overflows on Falcon: set compute_dtype=bf16 (Ampere or newer GPUs) or fp32, which keeps "
               "layer norms in fp32, or lower learning_rate")
    else:
        fix = (f"the update diverged: lower learning_rate (now {args.learning_rate:g}) or max_grad_norm, "
               "and check the rows of this step")
    raise NonFiniteError(f"training stopped at step {step}: {what} is {v} (not a finite number); {last}. "
                         f"Likely fix: {fix}; then {then}")


LEAN_STEPS = True  # the shortcuts below around each step's Python (False: Trainer's own, for the benchmark)


def safe_trainer_class(base):
    """`base` (SFTTrainer) with atomic checkpoints, NaN/inf stops and scrubbed arguments."""

    class SafeTrainer(base):
        _staging_dir = None
        run_config = None  # the RunConfig, for messages (set by train.build_trainer)

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._pending = []  # (what, host copy, CUDA event, step): values not checked yet (see _defer)
            scrub_args(self.args)
            # A non-finite loss stops the run (below), so Trainer's filter, which would log around it and train on,
            # is not needed; turning it off also drops its own host sync, so the check below costs nothing extra.
            self.args.logging_nan_inf_filter = False

        def _get_output_dir(self, trial):
            return self._staging_dir or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            self._check_pending(wait=True)  # never save weights a non-finite gradient has updated
            save_checkpoint_atomically(self, super()._save_checkpoint, model, trial)

        def training_step(self, model, inputs, *a, **kw):
            loss = super().training_step(model, inputs, *a, **kw)
            self._check_pending()
            # One process only: under DDP a NaN reaches every rank through the gradient all-reduce and the gradient
            # norm check stops all of them, so no rank waits on one that left.
            if self.args.world_size == 1:
                self._defer("loss", loss, self.state.global_step + 1)
            return loss

        # Trainer walks every module of the model after each micro-batch to count parameters for its FLOP total, and
        # at each step to find the gradients to clip: ~1,600 modules for Falcon-7B with LoRA, ~10 ms of Python per
        # step while the GPU waits (bench/NOTES.md). The count and the trainable tensors do not change in a run.
        def floating_point_ops(self, inputs):
            main = getattr(self.model, "main_input_name", "input_ids")
            if not LEAN_STEPS or main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if getattr(self, "_counted_params", None) is None:
                self._counted_params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._counted_params

        def _clip_grad_norm(self, model):
            from accelerate.utils import DistributedType
            if not LEAN_STEPS or self.accelerator.distributed_type != DistributedType.NO or \
                    self._has_mixed_mesh_grads(model):
                return super()._clip_grad_norm(model)  # sharded wrappers clip their own flat parameters
            if getattr(self, "_trained", None) is None:
                self._trained = [p for p in model.parameters() if p.requires_grad]
            return self.accelerator.clip_grad_norm_(self._trained, self.args.max_grad_norm)

        def _load_optimizer_and_scheduler(self, checkpoint):
            # a run may resume under another profile than it began with, whose AdamW names the same moments otherwise
            from .optimizer import convert_adamw_state
            opt = self.optimizer
            if checkpoint is None or opt is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            load = opt.load_state_dict
            opt.load_state_dict = lambda state: load(convert_adamw_state(state, opt))
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            finally:
                del opt.load_state_dict

        def _get_grad_norm(self, model, grad_norm=None):  # called just before optimizer.step()
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            self._defer("grad_norm", grad_norm, self.state.global_step + 1)
            return grad_norm

        def _defer(self, what, value, step):
            """Check `value` once the GPU has computed it, without making the host wait for the GPU: reading it
            right away would stall the GPU after every micro-batch (~8 % of a 4 x 4 step, bench/RESULTS.md). The
            value is copied to the host behind an event and checked at a later micro-batch, before any checkpoint
            is saved, and at the end of training."""
            import torch
            if not (isinstance(value, torch.Tensor) and value.is_cuda):
                self._check(what, value, step)
                return
            host = value.detach().float().reshape(()).to("cpu", non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((what, host, done, step))

        def _check_pending(self, wait=False):
            while self._pending and (wait or self._pending[0][2].query()):
                what, host, done, step = self._pending.pop(0)
                done.synchronize()
                self._check(what, host, step)

        def _check(self, what, value, step):
            check_finite(what, value, self, self.run_config, step=step)
            factor = getattr(self.run_config, "divergence_factor", None)
            if what == "loss" and factor:
                self._watch = getattr(self, "_watch", None) or DivergenceWatch(factor)
                self._watch.add(step, float(value), self, self.run_config)

        def log(self, logs, *a, **kw):
            meter = getattr(self, "meter", None)  # throughput.Meter, set by train.build_trainer
            if meter is not None:
                meter.update(logs)
            return super().log(logs, *a, **kw)

        def train(self, *a, **kw):
            if getattr(self, "meter", None) is not None:
                self.meter.start()
            # Python's full garbage collection walks every object alive, ~600k once torch, transformers and a
            # 1,600-module model are loaded: ~0.4 s with the GPU idle, every ~20 steps (bench/NOTES.md). What exists
            # before training outlives it, so it is frozen out of the collector's walks for the run.
            frozen = LEAN_STEPS
            if frozen:
                gc.collect()
                gc.freeze()
            try:
                out = super().train(*a, **kw)
            finally:
                if frozen:
                    gc.unfreeze()
            self._check_pending(wait=True)  # the last step's
            if getattr(self, "_watch", None):
                self._watch.flush(self, self.run_config)
            return out

    if not hasattr(base, "_get_grad_norm"):  # transformers moved its hook: say so rather than guard nothing
        import warnings
        warnings.warn(f"{base.__name__} has no _get_grad_norm: NaN/inf gradient norms are not checked", stacklevel=2)
    SafeTrainer.__name__ = SafeTrainer.__qualname__ = f"Safe{base.__name__}"
    return SafeTrainer


__all__ = ["StopOnSignal", "safe_trainer_class", "scrub_args", "secret_values", "files_with_secrets", "check_finite",
           "DivergenceWatch", "NonFiniteError", "DivergenceError"]
