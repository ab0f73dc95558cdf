"""Checkpoints that survive a kill, and Ctrl-C / SIGTERM that save before stopping: acts while training runs and at
its end (the run dir's names are rundir.py's; the per-step checks are safety.py's).

A checkpoint is written into a hidden staging folder and renamed into place (a rename is atomic on one filesystem),
so `checkpoint-N` is either complete or absent; a run killed at any moment resumes from the newest complete one:

    falcon-qlora train --config results/run_config.yaml --resume

SIGINT (Ctrl-C, Colab's stop button) and SIGTERM (preemption) let the current step finish, save a checkpoint, print
the command above and stop; a second Ctrl-C quits at once (the checkpoints already written stay intact). Before a
resume every file of the checkpoint is read back (verify); a damaged one is set aside and the newest intact one used.
The hidden names below are ours: whatever already has such a name (a link included) is removed, never followed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

from .errors import UserError
from .rundir import STAGING, TRASH, RunDir, copy_run_files, staging_of, step_of, trash_of

WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def is_complete(path: Path) -> bool:
    """trainer_state.json parses and names this step, and the weights are there (a copied or hand-made folder may
    lack them even though falcon-qlora's own saves are atomic)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return state.get("global_step") == step_of(path) and any((path / w).is_file() for w in WEIGHTS)


def checkpoint_dirs(out: Path) -> list[Path]:
    """Every folder named checkpoint-N in `out`, complete or not, oldest first."""
    if not Path(out).is_dir():
        return []
    return sorted((p for p in Path(out).iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    return [p for p in checkpoint_dirs(out) if is_complete(p)]


def remove(path: Path) -> None:
    """Delete `path` itself: a link or file is unlinked (its target is never touched), a real folder removed."""
    path = Path(path)
    if os.path.islink(path) or (os.path.lexists(path) and not path.is_dir()):
        os.unlink(path)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def fresh_dir(path: Path) -> Path:
    """A new, empty, real folder at `path`, whatever had that name before (a link to elsewhere included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove(path)
    os.mkdir(path)
    return path


def clean_leftovers(out: Path) -> None:
    """Remove staging/trash entries a killed run left behind (they are ours by name and never resumable)."""
    for p in Path(out).glob(".*"):
        if p.name.startswith((STAGING, TRASH)):
            remove(p)


def _unreadable(f: Path) -> str | None:
    """Why `f` cannot be loaded the way a resume loads it, or None. Cheap on a 7B's checkpoint: safetensors checks
    at open that its header covers the whole file, and zip-format .pt files are opened with mmap, which reads their
    index at the end of the file (what a truncation loses), not the tensors."""
    try:
        if f.suffix in (".safetensors", ".pt", ".pth", ".bin", ".json") and f.stat().st_size == 0:
            return "is empty"
        if f.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(f), "pt") as sf:
                sf.keys()
        elif f.suffix in (".pt", ".pth", ".bin"):
            import torch
            from transformers.trainer_pt_utils import safe_globals  # numpy RNG states, as Trainer loads them
            with safe_globals():
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        elif f.suffix == ".json":
            json.loads(f.read_text(encoding="utf-8"))
    except Exception as err:  # torch, safetensors and json each raise their own kinds
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        return f"cannot be read: {msg}"
    return None


def verify(ckpt: Path) -> str | None:
    """None when every file a resume reads loads (trainer state, adapter, optimizer, scheduler, RNG states, configs);
    otherwise what is wrong, naming the file. Sharded (FSDP) sub-folders are not read."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as err:
        return f"trainer_state.json cannot be read: {str(err).splitlines()[0][:120]}"
    if not isinstance(state, dict) or state.get("global_step") != step_of(ckpt):
        return f"trainer_state.json does not name step {step_of(ckpt)}"
    if not any((ckpt / w).is_file() for w in WEIGHTS):
        return "the adapter weights are missing"
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and f.name != "training_args.bin":  # the pickled arguments are never loaded on resume
            why = _unreadable(f)
            if why:
                return f"{f.name} {why}"
    return None


def set_aside_damaged(out: Path, cfg) -> list[str]:
    """Before a resume: rename every checkpoint newer than the newest intact one to checkpoint-N.damaged (kept for
    inspection, never resumed or rotated) and return one line for each. Damaged checkpoints and none intact: raise
    UserError with the command that starts over, rather than silently training from step 0."""
    notes = []
    for ckpt in reversed(checkpoint_dirs(out)):
        why = verify(ckpt)
        if why is None:
            return notes
        aside = ckpt.with_name(ckpt.name + ".damaged")
        remove(aside)
        os.replace(ckpt, aside)
        notes.append(f"{ckpt.name} is damaged ({why}); set aside as {aside.name}")
    if notes:
        start_over = shlex.join(["falcon-qlora", "train", "--config", str(RunDir(out).run_config),
                                 "--resume", "false", "--overwrite", "true"])
        raise UserError(f"no intact checkpoint to resume from in {out}: {'; '.join(notes)}. Start over with: "
                        f"{start_over}")
    return notes


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


def publish(src: Path, dst: Path) -> Path:
    """Rename a finished folder into place; an existing `dst` is moved aside first and deleted after."""
    _fsync_tree(src)
    old = trash_of(dst) if os.path.lexists(dst) else None
    if old:
        remove(old)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old:
        remove(old)
    return dst


@contextlib.contextmanager
def atomic_dir(dst: Path):
    """`with atomic_dir(out / "final") as tmp: save into tmp` -> `dst` appears complete or not at all."""
    dst = Path(dst)
    tmp = fresh_dir(staging_of(dst))
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    publish(tmp, dst)


def rotate(out: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints. Each old one is renamed away before it is deleted, so a kill
    mid-delete never leaves a partial folder named like a checkpoint."""
    if not keep:
        return
    for p in complete_checkpoints(out)[:-keep]:
        trash = trash_of(p)
        remove(trash)
        os.replace(p, trash)
        remove(trash)


def save_checkpoint_atomically(trainer, save, model, trial) -> None:
    """Run Trainer._save_checkpoint (`save`) into <out>/.staging-checkpoint-N, add the run config, rename it to
    <out>/checkpoint-N, then rotate. `trainer._staging_dir` redirects Trainer._get_output_dir meanwhile. Trainer
    names the checkpoint folder itself (inside the staging one), so this is atomic_dir's fresh_dir + publish with
    every process taking part, rather than atomic_dir."""
    run_dir = Path(trainer.args.output_dir)
    ckpt = RunDir(run_dir).checkpoint(trainer.state.global_step)
    name, staging = ckpt.name, staging_of(ckpt)
    try:
        if trainer.args.should_save:
            fresh_dir(staging)
        trainer.accelerator.wait_for_everyone()
        trainer._staging_dir = str(staging)
        try:
            save(model, trial)
        finally:
            trainer._staging_dir = None
        trainer.accelerator.wait_for_everyone()  # every rank's files (e.g. rng_state_<rank>.pth) are in
        if not trainer.args.should_save:
            return
        copy_run_files(run_dir, staging / name)  # every checkpoint is self-describing (chat/eval/merge read these)
        publish(staging / name, ckpt)
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        remove(staging)  # give the space back; the checkpoints already published are untouched
        raise disk_full(trainer.run_config, run_dir, f"writing {name}") from None
    remove(staging)
    rotate(run_dir, trainer.args.save_total_limit)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def standing(out: Path, cfg) -> tuple[str, str]:
    """Where a stopped run stands, for its one-line message: ('last good checkpoint X' or 'no checkpoint saved
    yet', 'resume with: COMMAND' or 'rerun')."""
    found = complete_checkpoints(Path(out))
    last = f"last good checkpoint {found[-1]}" if found else "no checkpoint saved yet"
    then = f"resume with: {resume_command(cfg)}" if found and cfg is not None else "rerun"
    return last, then


def disk_full(cfg, out: Path, what: str) -> UserError:
    """The one line for a disk that filled up during the run (after the start-up check passed)."""
    last, then = standing(out, cfg)
    return UserError(f"the disk of {out} is full (no space left on device) while {what}; {last}. Free some space, "
                     f"then {then}")


def load_finished(trainer, ckpt: Path) -> None:
    """The adapter weights and the trainer state (log history, step) of a checkpoint, without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    set_peft_model_state_dict(trainer.model, load_file(str(ckpt / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))


def resume_command(cfg) -> str:
    """The command that continues this run from its newest checkpoint."""
    parts = ["falcon-qlora", "train", "--config", str(RunDir(cfg.output_dir).run_config), "--resume", "true"]
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
        self.final = False  # True while final/, metrics.jsonl and loss.png are written

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == self.signum == signal.SIGINT:  # Ctrl-C twice: stop now (saved checkpoints are complete)
                self.__exit__(None, None, None)
                raise KeyboardInterrupt
            return  # e.g. torchrun's SIGTERM after the terminal's SIGINT: already stopping
        self.signum = signum
        doing = "finishing the final adapter, metrics and plot" if self.final else \
            "finishing this step and saving a checkpoint"
        os.write(2, f"\nfalcon-qlora: got {signal.Signals(signum).name}: {doing} (press Ctrl-C again to stop at "
                    "once)\n".encode())

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

    @contextlib.contextmanager
    def finishing(self, final: Path, show: bool = True):
        """Signals caught while the final folder, metrics and plot are written: they are finished first (seconds),
        then the run stops with one line (`show`: this process prints it) and status 130 instead of the push to the
        hub or the return."""
        self.final = True
        with self:
            yield
        if self.signum is not None and show:
            print(f"falcon-qlora: stopped by {signal.Signals(self.signum).name} after training finished; {final} "
                  "and the metrics were written first and are complete", file=sys.stderr, flush=True)
        if self.signum is not None:
            raise KeyboardInterrupt

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
