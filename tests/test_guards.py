"""Bad numbers and too little disk stop a run at once, in one line, with the step, the last good checkpoint and the
fix; rows that would train nothing under completion-only loss are counted and dropped."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_overrides, train_argv


def _poison_after_save(monkeypatch, step: int, how: str):
    """Once checkpoint-<step> is on disk, make the next step's numbers bad: a NaN LoRA weight (-> NaN loss), or an
    infinite gradient on one LoRA weight (finite loss, inf gradient norm)."""
    import falcon_qlora.train as T
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            if state.global_step != step:
                return
            p = next(p for n, p in model.named_parameters() if "lora_A" in n)
            if how == "nan":
                with torch.no_grad():
                    p[0, 0] = float("nan")
            else:
                p.register_hook(lambda g: torch.full_like(g, float("inf")))

    build = T.build_trainer
    monkeypatch.setattr(T, "build_trainer", lambda *a, callbacks=(), **k: build(*a, callbacks=[*callbacks, Poison()],
                                                                                  **k))


@pytest.mark.parametrize("how,what", [("nan", "loss is nan"), ("inf-grad", "grad_norm is inf")])
def test_non_finite_stops_at_that_step(how, what, tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    from falcon_qlora.cli import main
    out = tmp_path / "run"
    _poison_after_save(monkeypatch, 3, how)
    code = main(train_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=8, save_steps=3))
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert line.startswith(f"falcon-qlora train: error: training stopped at step 4: {what}"), line
    assert f"last good checkpoint {out / 'checkpoint-3'}" in line
    assert "lower learning_rate (now 0.003)" in line and "--resume" in line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"] and not (out / "final").exists()
    saved = load_file(str(out / "checkpoint-3" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())  # the last good checkpoint really is good


def _fake_trainer(fp16=False, scale=None, out="/nowhere"):
    scaler = SimpleNamespace(get_scale=lambda: scale) if scale is not None else None
    return SimpleNamespace(args=SimpleNamespace(output_dir=out, fp16=fp16, learning_rate=2e-4),
                           state=SimpleNamespace(global_step=41), accelerator=SimpleNamespace(scaler=scaler))


def test_fp16_overflow_message_names_the_fix():
    from falcon_qlora.safety import NonFiniteError, check_finite
    with pytest.raises(NonFiniteError) as err:
        check_finite("loss", torch.tensor(float("inf")), _fake_trainer(fp16=True))
    msg = str(err.value)
    assert "step 42: loss is inf" in msg and "no checkpoint saved yet" in msg
    assert "compute_dtype=bf16" in msg and "fp32" in msg


def test_fp16_grad_scaler_overflow_is_tolerated_until_the_scale_collapses():
    """The fp16 grad scaler skips steps with inf gradients on purpose while it lowers its scale; only an overflow
    at a scale below 1 is a real divergence."""
    from falcon_qlora.safety import NonFiniteError, check_finite
    check_finite("grad_norm", math.inf, _fake_trainer(fp16=True, scale=65536.0))  # no error
    check_finite("grad_norm", 0.7, _fake_trainer(fp16=True, scale=0.5))
    with pytest.raises(NonFiniteError, match="grad_norm is inf"):
        check_finite("grad_norm", math.inf, _fake_trainer(fp16=True, scale=0.5))
    with pytest.raises(NonFiniteError, match="loss is nan"):  # a NaN loss is never the scaler's doing
        check_finite("loss", math.nan, _fake_trainer(fp16=True, scale=65536.0))


def test_disk_too_small_refuses_before_training(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch, capsys):
    import shutil
    from falcon_qlora.cli import main
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=200_000))
    code = main(train_argv(tiny_falcon_7b_arch, tiny_data, tmp_path / "run", save_total_limit=3))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "has 0.2 MB free but the run needs about" in line, line
    assert "save_total_limit=3" in line and "lower save_total_limit" in line
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_checkpoint_size_estimate_matches_what_is_written(tiny_falcon_7b_arch, tiny_data, tmp_path):
    """The size the disk check assumes per checkpoint (fp32 adapter + AdamW's two fp32 moments per trainable
    parameter, the tokenizer, a little state) is what a checkpoint takes."""
    from falcon_qlora.config import make_config
    from falcon_qlora.memory import disk_estimate
    from falcon_qlora.train import train
    cfg = make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "run", max_steps=2, save_steps=2,
                                       eval_split=None))
    res = train(cfg)
    trainable = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    written = sum(p.stat().st_size for p in (res.output_dir / "checkpoint-2").iterdir())
    assert 0.8 < written / disk_estimate(cfg, trainable)["checkpoint_bytes"] < 1.25


def test_rows_with_no_answer_within_max_length_are_counted_and_dropped(tiny_falcon_7b_arch, capsys):
    """Completion-only loss: a row whose prompt fills max_length has every label masked; training on it would add
    zero-loss rows. They are dropped with a count."""
    from datasets import Dataset
    from falcon_qlora.config import make_config
    from falcon_qlora.data import tokenize_completion_only
    from falcon_qlora.errors import UserError
    from falcon_qlora.model import load_tokenizer
    cfg = make_config(model_name_or_path=str(tiny_falcon_7b_arch), max_length=24, completion_only_loss=True)
    tok = load_tokenizer(str(tiny_falcon_7b_arch), cfg)
    short = "### Human: what is two plus two? ### Assistant: four."
    long = "### Human: " + "what is two plus two " * 20 + "? ### Assistant: four."
    ds = Dataset.from_list([{"text": t} for t in [short, long, short, long, long]])
    out = tokenize_completion_only(ds, tok, cfg)
    assert len(out) == 2 and all(any(m) for m in out["completion_mask"])
    assert "3 rows have no assistant token within max_length=24 and were dropped" in capsys.readouterr().out
    with pytest.raises(UserError, match="raise max_length"):
        tokenize_completion_only(Dataset.from_list([{"text": long}]), tok, cfg)


def _watch_steps(losses, factor=2.0):
    from falcon_qlora.safety import DivergenceWatch
    watch, trainer = DivergenceWatch(factor), _fake_trainer()
    for step, loss in enumerate(losses, start=1):
        watch.add(step, loss, trainer, None)
    watch.flush(trainer, None)


def test_divergence_needs_five_steps_in_a_row_above_twice_the_first_loss():
    from falcon_qlora.safety import DivergenceError
    _watch_steps([3.4, 7.0, 7.5, 7.9, 8.0, 2.0, 9.0, 9.0])         # a spike that recovers: trains on
    _watch_steps([12.0, 11.99, 11.9, 11.8, 11.7])                   # the benchmark runs: flat or falling
    with pytest.raises(DivergenceError, match=r"training stopped at step 7: .*above 2x its first value"):
        _watch_steps([3.4, 3.0, 7.0, 9.0, 12.0, 15.0, 15.8])


def test_a_diverging_run_stops_with_the_step_and_its_last_checkpoint(tiny_falcon_7b_arch, tiny_data, tmp_path,
                                                                     monkeypatch, capsys):
    """A loss that climbs (here: the trainer's loss scaled up from step 4 on) stops the run in one line."""
    import trl
    from falcon_qlora.cli import main
    real = trl.SFTTrainer.training_step

    def climbing(self, *a, **kw):
        loss = real(self, *a, **kw)
        return loss * 10 if self.state.global_step >= 3 else loss
    monkeypatch.setattr(trl.SFTTrainer, "training_step", climbing)
    out = tmp_path / "run"
    code = main(train_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=12, save_steps=3))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert line.startswith("falcon-qlora train: error: training stopped at step 8: the loss has stayed above 2x")
    assert f"last good checkpoint {out / 'checkpoint-6'}" in line and "divergence_factor=None" in line
    assert not (out / "final").exists()


def test_the_divergence_check_can_be_switched_off(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch):
    import trl
    from falcon_qlora.cli import main
    real = trl.SFTTrainer.training_step
    monkeypatch.setattr(trl.SFTTrainer, "training_step",
                        lambda self, *a, **kw: real(self, *a, **kw) * (10 if self.state.global_step >= 3 else 1))
    out = tmp_path / "run"
    assert main(train_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=9, save_steps=100,
                      divergence_factor="None")) == 0
    assert (out / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_disk_full_during_the_run_names_the_last_good_checkpoint(where, tiny_falcon_7b_arch, tiny_data, tmp_path,
                                                                 monkeypatch, capsys):
    """The disk filling up after the start-up check passed (simulated: ENOSPC from the save of checkpoint-4's
    optimizer state, or from the metrics written after final/): one line with the last good checkpoint and the
    resume command; nothing half-written is left behind and checkpoint-2 still loads."""
    import errno
    import falcon_qlora.train as T
    from falcon_qlora.checkpoints import resume_command, verify
    from falcon_qlora.cli import main
    from falcon_qlora.config import make_config
    out = tmp_path / "run"
    real_save = torch.save

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj, f, *a, **k):
        if str(f).endswith("checkpoint-4/optimizer.pt"):
            full()
        return real_save(obj, f, *a, **k)
    if where == "checkpoint":
        monkeypatch.setattr(torch, "save", save)
    else:
        monkeypatch.setattr(T, "write_metrics", full)
    code = main(train_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=4, save_steps=2, eval_split=None))
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    cfg = make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, out))
    assert code == 2 and lines[-1].startswith(f"falcon-qlora train: error: the disk of {out} is full"), lines[-3:]
    last = "checkpoint-4" if where == "final" else "checkpoint-2"
    assert f"last good checkpoint {out / last}" in lines[-1] and resume_command(cfg) in lines[-1]
    assert not list(out.glob(".staging-*")) and verify(out / last) is None


def test_bitsandbytes_kernel_probe_message_is_silenced(caplog):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on CPUs with
    AVX512-BF16; importing falcon_qlora drops that one message and nothing else from that logger."""
    import logging
    import falcon_qlora  # noqa: F401  (installs the filter)
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        log.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


@pytest.mark.slow  # two fresh interpreters importing torch
def test_importing_bitsandbytes_through_falcon_qlora_prints_no_kernel_message():
    import subprocess
    import sys

    def stderr_of(code):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr + proc.stdout
    if "gemm_4bit_forward" not in stderr_of("import bitsandbytes"):
        pytest.skip("bitsandbytes logs no kernel message on this CPU (it has no AVX512-BF16, or kernels loaded)")
    assert "gemm_4bit_forward" not in stderr_of("import falcon_qlora.model, bitsandbytes, bitsandbytes.functional")
