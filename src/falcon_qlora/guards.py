"""Checks that stop a run early and say why: non-finite numbers, too little disk, a broken bitsandbytes, and output
paths that would land outside the output directory."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from .errors import UserError


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


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_disk(cfg, model) -> int:
    """Refuse to start when the checkpoints kept under save_total_limit (+1 while the next is written, + the final
    adapter; sizes from estimate.disk_estimate) do not fit in the free space of output_dir. Returns bytes needed."""
    from .checkpoints import complete_checkpoints
    from .estimate import disk_estimate
    est = disk_estimate(cfg, sum(p.numel() for p in model.parameters() if p.requires_grad))
    have = len(complete_checkpoints(Path(cfg.output_dir)))  # already on disk when resuming
    need = max(0, est["disk_peak_bytes"] - have * est["checkpoint_bytes"])
    free = shutil.disk_usage(cfg.output_dir).free
    if need > free:
        raise UserError(f"output_dir {cfg.output_dir} has {_gb(free)} free but the run needs about {_gb(need)} "
                        f"({est['checkpoints_kept']} checkpoints of {_gb(est['checkpoint_bytes'])} kept by "
                        f"save_total_limit={cfg.save_total_limit}, one more while saving, the final adapter): free "
                        "disk, lower save_total_limit, or choose another --output_dir")
    return need


def check_bitsandbytes(device: str | None = None) -> None:
    """4-bit loading needs a bitsandbytes that imports and can quantize on this device; check with a tiny tensor
    so a broken install fails in one line, before data or model loading."""
    try:
        import torch
        import bitsandbytes.functional as F
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        F.quantize_4bit(torch.ones(64, dtype=torch.float32, device=device), quant_type="nf4")
    except Exception as err:  # ImportError, missing CUDA library, no kernel for this device
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"bitsandbytes cannot quantize to 4-bit on {device or 'this machine'} ({msg}): "
                        "pip install -U bitsandbytes (falcon-qlora doctor shows details), "
                        "or set load_in_4bit=false for plain LoRA") from None


def inside(root: Path, *parts: str) -> Path:
    """root/parts, refusing any result (after resolving '..' and symlinks) that leaves root."""
    root_real = Path(os.path.realpath(root))
    path = Path(root).joinpath(*parts)
    real = Path(os.path.realpath(path))
    if real != root_real and root_real not in real.parents:
        raise UserError(f"{path} resolves to {real}, outside the output directory {root_real}: remove that "
                        "link or name, or choose another --output_dir")
    return path


def check_output_paths(out: Path) -> None:
    """Everything falcon-qlora will write under output_dir must stay there (e.g. no `final` symlink elsewhere). The
    hidden staging and trash names are not checked: they are always removed and recreated (checkpoints.fresh_dir)."""
    from .rundir import RunDir
    for name in RunDir(out).written_names():
        inside(out, name)


def quiet_bitsandbytes() -> None:
    """bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every import on CPUs
    with AVX512-BF16 when the optional `kernels` package (a hub download) is absent or offline. Nothing is lost
    (its own kernel is used), so that one message is dropped; the logger's other messages still show."""
    import logging

    class _DropKernelProbe(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(type(f).__name__ == "_DropKernelProbe" for f in logger.filters):
        logger.addFilter(_DropKernelProbe())
