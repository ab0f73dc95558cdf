"""Checkpoints that survive a kill, and Ctrl-C / SIGTERM that save before stopping.

A checkpoint is written into a hidden staging folder and renamed into place (a rename is atomic on one filesystem),
so `checkpoint-N` is either complete or absent; a run killed at any moment resumes from the newest complete one:

    falcon-qlora train --config results/run_config.yaml --resume

SIGINT (Ctrl-C, Colab's stop button) and SIGTERM (preemption) let the current step finish, save a checkpoint, print
the command above and stop; a second Ctrl-C quits at once (the checkpoints already written stay intact).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

STAGING, TRASH = ".staging-", ".trash-"  # hidden names: never matched by `checkpoint-*`
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def step_of(path: Path) -> int | None:
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def is_complete(path: Path) -> bool:
    """trainer_state.json parses and names this step, and the weights are there (a copied or hand-made folder may
    lack them even though falcon-qlora's own saves are atomic)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return state.get("global_step") == step_of(path) and any((path / w).is_file() for w in WEIGHTS)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    if not Path(out).is_dir():
        return []
    found = [p for p in Path(out).iterdir() if p.is_dir() and step_of(p) is not None and is_complete(p)]
    return sorted(found, key=step_of)


def clean_leftovers(out: Path) -> None:
    """Remove staging/trash folders a killed run left behind (they are ours by name and never resumable)."""
    for p in Path(out).glob(".*"):
        if p.is_dir() and p.name.startswith((STAGING, TRASH)):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename publishes them (matters on power loss, not on SIGKILL)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems (e.g. FUSE mounts) refuse fsync on a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_for(dst: Path) -> Path:
    return Path(dst).with_name(f"{STAGING}{Path(dst).name}")


def publish(src: Path, dst: Path) -> Path:
    """Rename a finished folder into place; an existing `dst` is moved aside first and deleted after."""
    _fsync_tree(src)
    old = dst.with_name(f"{TRASH}{dst.name}") if dst.exists() else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_dir(dst: Path):
    """`with atomic_dir(out / "final") as tmp: save into tmp` -> `dst` appears complete or not at all."""
    dst = Path(dst)
    tmp = staging_for(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, dst)


def rotate(out: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints. Each old one is renamed away before it is deleted, so a kill
    mid-delete never leaves a partial folder named like a checkpoint."""
    if not keep:
        return
    for p in complete_checkpoints(out)[:-keep]:
        trash = p.with_name(f"{TRASH}{p.name}")
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint_atomically(trainer, save, model, trial) -> None:
    """Run Trainer._save_checkpoint (`save`) into <out>/.staging-checkpoint-N, add the run config, rename it to
    <out>/checkpoint-N, then rotate. `trainer._staging_dir` redirects Trainer._get_output_dir meanwhile."""
    run_dir = Path(trainer.args.output_dir)
    name = f"checkpoint-{trainer.state.global_step}"
    staging = run_dir / f"{STAGING}{name}"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer._staging_dir = str(staging)
    try:
        save(model, trial)
    finally:
        trainer._staging_dir = None
    trainer.accelerator.wait_for_everyone()  # every rank's files (e.g. rng_state_<rank>.pth) are in
    if not trainer.args.should_save:
        return
    config = run_dir / "run_config.yaml"
    if config.is_file():  # every checkpoint is self-describing (chat/eval/merge read it)
        shutil.copy2(config, staging / name / config.name)
    publish(staging / name, run_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    rotate(run_dir, trainer.args.save_total_limit)


def load_finished(trainer, ckpt: Path) -> None:
    """The adapter weights and the trainer state (log history, step) of a checkpoint, without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    set_peft_model_state_dict(trainer.model, load_file(str(ckpt / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))


def resume_command(cfg) -> str:
    """The command that continues this run from its newest checkpoint."""
    parts = ["falcon-qlora", "train", "--config", str(Path(cfg.output_dir) / "run_config.yaml"), "--resume", "true"]
    if cfg.overwrite:
        parts += ["--overwrite", "false"]
    return shlex.join(parts)


def _any_rank(signum: int | None, device) -> int | None:
    """The signal any process received (one small all-reduce per optimizer step, only with several processes)."""
    import torch
    import torch.distributed as dist
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


class StopOnSignal:
    """SIGINT/SIGTERM -> finish the step, save, stop. Use as a context manager around trainer.train(); `callback`
    is the TrainerCallback to register."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        from transformers import TrainerCallback
        self.signum = None
        owner = self

        class SaveAndStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if args.world_size > 1:  # ranks see the signal at different steps: agree on one, or they hang
                    owner.signum = _any_rank(owner.signum, args.device)
                if owner.signum is not None:
                    control.should_save = True
                    control.should_training_stop = True

        self.callback = SaveAndStop()
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == self.signum == signal.SIGINT:  # Ctrl-C twice: stop now (saved checkpoints are complete)
                self.__exit__(None, None, None)
                raise KeyboardInterrupt
            return  # e.g. torchrun's SIGTERM after the terminal's SIGINT: already stopping
        self.signum = signum
        os.write(2, f"\nfalcon-qlora: got {signal.Signals(signum).name}: finishing this step and saving a "
                    "checkpoint (press Ctrl-C again to stop at once)\n".encode())

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def train(self, trainer, resume: str | None) -> None:
        """trainer.train() with the signals caught. A checkpoint already at max_steps is a finished run: load it
        instead (transformers 5.24 would train one step past max_steps when resumed from it)."""
        with self:
            if resume and step_of(Path(resume)) >= trainer.args.max_steps:
                load_finished(trainer, Path(resume))
            else:
                trainer.train(resume_from_checkpoint=resume)

    def report(self, trainer, cfg) -> None:
        """After trainer.train(): if a signal stopped training early, print where it is saved and how to resume,
        then raise KeyboardInterrupt (the CLI exits with status 130)."""
        if self.signum is None or trainer.state.global_step >= trainer.state.max_steps:
            return
        found = complete_checkpoints(Path(cfg.output_dir))
        where = found[-1] if found else "no checkpoint"
        if trainer.args.process_index == 0:
            print(f"falcon-qlora: stopped by {signal.Signals(self.signum).name} at step {trainer.state.global_step}; "
                  f"saved {where}. Resume with: {resume_command(cfg)}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
