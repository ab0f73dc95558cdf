"""Interruption: a run killed at any moment and resumed with --resume ends with the same adapter as an uninterrupted
run; Ctrl-C and SIGTERM save a checkpoint and print the command that resumes.

One helper process imports the stack once and forks a child per run (a fresh interpreter per run would spend ~10 s
importing torch/transformers/TRL each time). Each child runs the real CLI, `falcon_qlora.cli.main([...])`, and dies
by a real SIGKILL at a chosen moment: at a random step, half-way through writing a checkpoint file, after a
checkpoint is renamed away for deletion, just before a checkpoint or the final folder is renamed into place, and at
a random wall-clock moment sent from outside. Every restart resumes the same output dir.
"""
from __future__ import annotations

import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import train_argv

SEED = int(os.environ.get("FQ_KILL_SEED", "0"))  # the random kill steps/delay; set it to explore others
MAX_STEPS, SAVE_STEPS, LIMIT = 20, 4, 2


def _argv(model, data, out, **kw) -> list[str]:
    return train_argv(model, data, out, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=LIMIT,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, lora_dropout=0.1, **kw)


def _install_hook(hook: list) -> None:
    """In the child: arrange to die (or be signalled) at one moment of the run."""
    import shutil
    import torch
    from transformers import Trainer
    me = os.getpid()
    kind, arg = hook
    if kind in ("step", "sigint", "sigterm"):
        sig = {"step": signal.SIGKILL, "sigint": signal.SIGINT, "sigterm": signal.SIGTERM}[kind]
        orig_step, fired = Trainer.training_step, []

        def training_step(self, *a, **k):  # called for step global_step + 1, after step global_step was saved
            if self.state.global_step == arg and not fired:  # once: a second Ctrl-C means "quit now"
                fired.append(1)
                os.kill(me, sig)
            return orig_step(self, *a, **k)
        Trainer.training_step = training_step
    elif kind == "half-write":  # arg: a file name inside a staging checkpoint; write half of it, then die
        orig_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)) and Path(f).name == arg and ".staging-" in str(f):
                buf = io.BytesIO()
                orig_save(obj, buf, *a, **k)
                Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
                os.kill(me, signal.SIGKILL)
            return orig_save(obj, f, *a, **k)
        torch.save = save
    elif kind == "mid-delete":  # an old checkpoint was renamed away for rotation; delete one file of it, then die
        orig_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if Path(path).name.startswith(".trash-checkpoint-") and Path(path).is_dir():
                next(p for p in Path(path).iterdir() if p.is_file()).unlink()
                os.kill(me, signal.SIGKILL)
            return orig_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
    elif kind == "before-rename":  # arg: the folder name about to be published (checkpoint-N or final)
        orig_replace = os.replace

        def replace(src, dst, *a, **k):
            if Path(dst).name == arg and ".staging-" in str(src):
                os.kill(me, signal.SIGKILL)
            return orig_replace(src, dst, *a, **k)
        os.replace = replace


def serve(plan_file: str) -> None:
    """The helper process: import once, then fork one child per planned run; write what happened to each."""
    import bitsandbytes, datasets, matplotlib.pyplot, peft, torch, trl  # noqa: F401, E401
    import falcon_qlora.cli, falcon_qlora.data, falcon_qlora.model, falcon_qlora.safety, falcon_qlora.train  # noqa
    torch.set_num_threads(1)  # identical numerics in every child, and polite on a shared CPU
    plan = json.loads(Path(plan_file).read_text())
    results = []
    for i, run in enumerate(plan["runs"]):
        log = Path(plan["logs"]) / f"run{i}.log"
        log.write_text("")
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if run["hook"]:
                _install_hook(run["hook"])
            from falcon_qlora.cli import main
            code = main(run["argv"])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        status = None
        if run.get("external_kill_after") is not None:  # once the child trains, kill it at a random moment
            while (status := os.waitpid(pid, os.WNOHANG)[1] or None) is None:
                if "'loss'" in log.read_text(errors="replace"):
                    time.sleep(run["external_kill_after"])
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        if status is None:
            _, status = os.waitpid(pid, 0)
        out = Path(run["out"])
        results.append({
            "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "complete": [p.name for p in falcon_qlora.train.checkpoints(out)],
            "entries": sorted(p.name for p in out.iterdir()) if out.is_dir() else [],
            "log": log.read_text(errors="replace")[-3000:],
        })
    Path(plan["results"]).write_text(json.dumps(results))


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def chain(tiny_falcon_7b_arch, tiny_data, tmp_path_factory):
    """An uninterrupted reference run, then one output dir interrupted 9 times (7 SIGKILLs, SIGINT, SIGTERM) and
    resumed each time, the last time to the end."""
    tmp = tmp_path_factory.mktemp("resume")
    rng = random.Random(SEED)
    ref, out = tmp / "ref", tmp / "run"
    first = _argv(tiny_falcon_7b_arch, tiny_data, out)
    resume = ["train", "--config", str(out / "run_config.yaml"), "--resume", "true"]  # what the CLI prints
    hooks = [
        ["step", rng.randint(1, SAVE_STEPS - 1)],       # before any checkpoint exists
        ["half-write", "optimizer.pt"],                 # inside checkpoint-4's write
        ["step", rng.randint(5, 7)],                    # random step after checkpoint-4
        ["before-rename", "checkpoint-8"],              # checkpoint-8 fully staged, not yet renamed
        ["sigint", 9],                                  # Ctrl-C while computing step 10: saves checkpoint-10
        ["mid-delete", None],                           # checkpoint-12 saved; rotation half-deleted checkpoint-8
        ["sigterm", rng.randint(13, 15)],               # preemption: saves checkpoint at that step + 1
        ["external", None],                             # SIGKILL from outside at a random moment
        ["before-rename", "final"],                     # all steps done, final/ staged, not yet renamed
        None,                                           # resume to the end
    ]
    runs = [{"argv": _argv(tiny_falcon_7b_arch, tiny_data, ref), "hook": None, "out": str(ref)}]
    for i, hook in enumerate(hooks):
        run = {"argv": first if i == 0 else resume, "hook": hook, "out": str(out)}
        if hook and hook[0] == "external":
            run["hook"], run["external_kill_after"] = None, rng.uniform(0.0, 0.5)
        runs.append(run)
    plan = {"runs": runs, "logs": str(tmp), "results": str(tmp / "results.json")}
    (tmp / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           # The helper forks after importing bitsandbytes, which starts CUDA where there is a GPU, and CUDA does not
           # survive a fork; kills and resumes do not depend on the device, so the chain runs on the CPU everywhere.
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", f"import test_resume; test_resume.serve({str(tmp / 'plan.json')!r})"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    return {"ref": ref, "out": out, "hooks": hooks, "results": results}


@pytest.mark.slow
def test_interrupted_nine_times_ends_with_the_same_adapter(chain):
    ref, *interrupted = chain["results"]
    assert ref["exit"] == 0, ref["log"]
    final = interrupted[-1]
    assert final["exit"] == 0, final["log"]
    # 6 planned SIGKILLs always land; the one sent from outside at a random moment usually does too
    assert sum(r["killed"] for r in interrupted) >= 6, [r["log"][-500:] for r in interrupted]
    a, b = _adapter(chain["ref"] / "final"), _adapter(chain["out"] / "final")
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    earlier = _adapter(chain["ref"] / f"checkpoint-{MAX_STEPS - SAVE_STEPS}")
    assert max((a[k] - earlier[k]).abs().max().item() for k in a) > 1e-3  # a few steps more or less would show


@pytest.mark.slow
def test_half_written_checkpoint_is_never_resumed_from(chain):
    r = dict(zip(map(lambda h: tuple(h) if h else None, chain["hooks"]), chain["results"][1:]))
    half = r[("half-write", "optimizer.pt")]
    assert half["killed"] and half["complete"] == []  # checkpoint-4 was being written: not offered for resume
    assert ".staging-checkpoint-4" in half["entries"] and "checkpoint-4" not in half["entries"]
    staged = r[("before-rename", "checkpoint-8")]
    assert staged["killed"] and "checkpoint-8" not in staged["complete"]
    deleted = r[("mid-delete", None)]
    assert deleted["killed"] and ".trash-checkpoint-8" in deleted["entries"]
    assert "checkpoint-8" not in deleted["entries"] and deleted["complete"] == ["checkpoint-10", "checkpoint-12"]
    # the run after each of these resumed from the newest complete checkpoint, not the partial one
    logs = [x["log"] for x in chain["results"][1:]]
    i = chain["hooks"].index(["half-write", "optimizer.pt"])
    assert "no checkpoint in" in logs[i + 1] and "resuming from" not in logs[i + 1]
    assert "resuming from" in logs[i + 2] and "checkpoint-4" in logs[i + 2]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["sigint", "sigterm"])
def test_signal_saves_a_checkpoint_and_prints_the_resume_command(chain, sig):
    hook = next(h for h in chain["hooks"] if h and h[0] == sig)
    res = chain["results"][1 + chain["hooks"].index(hook)]
    assert not res["killed"] and res["exit"] == 130, res["log"][-1500:]
    step = hook[1] + 1  # the step being computed when the signal came is finished, then saved
    assert f"checkpoint-{step}" in res["complete"]
    line = next(x for x in res["log"].splitlines() if "Resume with:" in x)
    assert f"stopped by {sig.upper()} at step {step}" in line
    cmd = shlex.split(line.split("Resume with:", 1)[1])
    assert cmd == ["falcon-qlora", "train", "--config", str(chain["out"] / "run_config.yaml"), "--resume", "true"]
    # the next run, started with exactly that command, continued from that checkpoint
    nxt = chain["results"][2 + chain["hooks"].index(hook)]["log"]
    assert f"resuming from {chain['out'] / f'checkpoint-{step}'}" in nxt


# ---------------------------------------------------------------------------------- damaged checkpoints
def _small_argv(model, data, out, **kw) -> list[str]:
    return train_argv(model, data, out, **{"max_steps": 4, "save_steps": 2, "save_total_limit": None,
                                           "eval_split": None, **kw})


@pytest.fixture(scope="module")
def finished(tiny_falcon_7b_arch, tiny_data, tmp_path_factory):
    """A finished run with checkpoint-2, checkpoint-4 and final/ (both checkpoints intact)."""
    from falcon_qlora.cli import main
    out = tmp_path_factory.mktemp("damaged") / "run"
    assert main(_small_argv(tiny_falcon_7b_arch, tiny_data, out)) == 0
    return out


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {  # file -> how it is damaged -> what verify says
    "truncated optimizer.pt": ("optimizer.pt", _truncate, "optimizer.pt cannot be read"),
    "empty optimizer.pt": ("optimizer.pt", lambda f: f.write_bytes(b""), "optimizer.pt is empty"),
    "truncated adapter": ("adapter_model.safetensors", _truncate, "adapter_model.safetensors cannot be read"),
    "truncated rng state": ("rng_state.pth", _truncate, "rng_state.pth cannot be read"),
    "truncated scheduler": ("scheduler.pt", _truncate, "scheduler.pt cannot be read"),
    "broken trainer state": ("trainer_state.json", lambda f: f.write_text('{"global_step": 4, '),
                             "trainer_state.json cannot be read"),
}


def _damaged_copy(finished, tmp_path, case, which=("checkpoint-4",)) -> Path:
    """A copy of the finished run (its run_config.yaml pointing at the copy) with files of `which` damaged."""
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    config = out / "run_config.yaml"
    config.write_text(config.read_text().replace(str(finished), str(out)))
    name, damage, _ = DAMAGE[case]
    for ck in which:
        damage(out / ck / name)
    return out


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_for_the_previous_one(case, finished, tmp_path, capsys):
    """Every file a resume loads is read back first; the damaged newest checkpoint is named in one line, set aside
    as checkpoint-4.damaged, and the intact checkpoint-2 becomes the newest."""
    from falcon_qlora.checkpoints import verify
    from falcon_qlora.config import make_config
    from falcon_qlora.train import checkpoints, prepare_output_dir
    out = _damaged_copy(finished, tmp_path, case)
    assert verify(finished / "checkpoint-4") is None
    assert DAMAGE[case][2] in verify(out / "checkpoint-4")
    prepare_output_dir(make_config(output_dir=str(out), resume=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falcon-qlora: checkpoint-4 is damaged (") and DAMAGE[case][2] in err[0]
    assert "set aside as checkpoint-4.damaged" in err[0]
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"] and (out / "checkpoint-4.damaged").is_dir()


def test_resume_past_a_damaged_checkpoint_ends_with_the_same_adapter(finished, tiny_falcon_7b_arch, tiny_data,
                                                                      tmp_path, capsys):
    """The resume command, with checkpoint-4's optimizer state truncated: it continues from checkpoint-2 and ends
    with the adapter of the undamaged run."""
    from falcon_qlora.cli import main
    out = _damaged_copy(finished, tmp_path, "truncated optimizer.pt")
    shutil.rmtree(out / "final")
    assert main(["train", "--config", str(out / "run_config.yaml"), "--resume", "true"]) == 0
    printed = capsys.readouterr()
    assert "checkpoint-4 is damaged (optimizer.pt cannot be read" in printed.err
    assert f"resuming from {out / 'checkpoint-2'}" in printed.out
    a, b = _adapter(finished / "final"), _adapter(out / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_no_intact_checkpoint_is_one_line_with_how_to_start_over(finished, tmp_path, capsys):
    from falcon_qlora.cli import main
    out = _damaged_copy(finished, tmp_path, "broken trainer state", which=("checkpoint-2", "checkpoint-4"))
    assert main(["train", "--config", str(out / "run_config.yaml"), "--resume", "true"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"falcon-qlora train: error: no intact checkpoint to resume "
                                                   f"from in {out}: checkpoint-4 is damaged"), lines
    assert "checkpoint-2 is damaged" in lines[0]
    cmd = shlex.split(lines[0].split("Start over with: ", 1)[1])
    assert cmd == ["falcon-qlora", "train", "--config", str(out / "run_config.yaml"), "--resume", "false",
                   "--overwrite", "true"]


def test_killed_while_the_model_loads_resumes_with_the_printed_command(tiny_falcon_7b_arch, tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    """run_config.yaml is written before any model loads, so `--config <out>/run_config.yaml --resume true` works
    after a kill during the (minutes-long, on a 7B) model load."""
    import falcon_qlora.model as M
    from falcon_qlora.cli import main
    out = tmp_path / "run"

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for the kill: nothing after this point runs
    with monkeypatch.context() as m:
        m.setattr(M, "load_base_model", killed)
        assert main(_small_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=2)) == 130
    assert (out / "run_config.yaml").is_file()
    assert main(["train", "--config", str(out / "run_config.yaml"), "--resume", "true"]) == 0
    assert f"no checkpoint in {out}: starting from step 0" in capsys.readouterr().out
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_sigterm_while_final_is_written_finishes_it_then_stops(tiny_falcon_7b_arch, tiny_data, tmp_path,
                                                                monkeypatch, capsys):
    """SIGTERM arriving while final/, metrics.jsonl and loss.png are written: they are finished, then one line and
    exit status 130 (not a silent death by the signal with no loss.png)."""
    import falcon_qlora.train as T
    from falcon_qlora.cli import main

    def unexpected(signum, frame):  # only reached if falcon-qlora does not catch the signal itself
        raise RuntimeError("SIGTERM was not handled by falcon-qlora")
    previous = signal.signal(signal.SIGTERM, unexpected)
    real = T.write_metrics

    def write_metrics(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(T, "write_metrics", write_metrics)
    out = tmp_path / "run"
    try:
        code = main(_small_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 130, err[-2000:]
    assert f"stopped by SIGTERM after training finished; {out / 'final'}" in err
    assert (out / "loss.png").is_file() and (out / "metrics.jsonl").is_file()
    assert (out / "final" / "adapter_model.safetensors").is_file()
