"""Pre-flight checks, run before training starts: too little disk, a broken bitsandbytes, output paths that would land
outside the output directory. A new check of the machine or the inputs goes here; checks made while training runs
(non-finite numbers, divergence) live in safety.py, the data's own in data.py."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UserError


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_disk(cfg, model) -> int:
    """Refuse to start when the checkpoints kept under save_total_limit (+1 while the next is written, + the final
    adapter; sizes from memory.disk_estimate) do not fit in the free space of output_dir. Returns bytes needed."""
    from .checkpoints import complete_checkpoints
    from .memory import disk_estimate
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
