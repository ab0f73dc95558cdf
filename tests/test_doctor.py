"""doctor: one screen on the environment; exit status 1 exactly when a run of the config would fail."""
from __future__ import annotations

import pytest
from conftest import tiny_overrides

from falcon_qlora import doctor
from falcon_qlora.config import load_config


def _args(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v))]


def test_bitsandbytes_4bit_matmul_really_runs_forward_and_backward_after_an_eval():
    import torch
    (status, msg), *rest = doctor.check_bnb_matmul()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert status == doctor.OK and f"NF4 matmul on {device}" in msg and "backward after an eval-mode forward" in msg


def test_an_avx512_bf16_cpu_is_reported_with_what_falcon_qlora_does_about_it():
    """Where bitsandbytes would repack (a CPU with AVX512-BF16, no GPU), doctor shows the wrong gradient it would
    give and says that falcon-qlora keeps the trainable layout; elsewhere it has nothing to report."""
    import torch
    from bitsandbytes.functional import has_avx512bf16
    lines = doctor.check_bnb_matmul()
    if torch.cuda.is_available() or not has_avx512bf16():
        assert len(lines) == 1
        return
    [(_, _), (status, msg)] = lines
    assert status == doctor.INFO and "AVX512-BF16" in msg and "turns that repacking off" in msg
    assert "the backward after it is wrong" in msg


def test_reference_recipe_on_this_cpu_fails(capsys):
    """Falcon-7B without a GPU (and without the hub) cannot run: non-zero exit, the reason on its own line."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the 'no GPU' verdict cannot be checked here")
    assert doctor.cli(["--config", "reference"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  no CUDA GPU found" in out
    assert "would fail" in out.splitlines()[-1]


def test_local_tiny_run_passes(tiny_falcon_7b_arch, tiny_data, tmp_path, capsys):
    ov = tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "run")
    assert doctor.cli(_args(ov)) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes NF4 matmul" in out and "disk:" in out and "hub:" in out
    assert out.splitlines()[-1] == "no problems found: this config can run here"


def test_transformers_5_4_with_trl_1_16_flagged_under_accumulation(monkeypatch):
    versions = {"transformers": "5.4.0", "trl": "1.16.0"}
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda pkg: versions.get(pkg) or real(pkg))
    accum = doctor.check_versions(load_config("reference"), "falcon")          # gradient_accumulation_steps 4
    single = doctor.check_versions(load_config("reference", gradient_accumulation_steps=1), "falcon")
    assert any(s == doctor.FAIL and "scales gradients wrongly" in m for s, m in accum)
    assert any(s == doctor.FAIL and "transformers 5.4.0 is outside" in m for s, m in accum)  # pyproject's range
    assert not any(s == doctor.FAIL and "scales gradients" in m for s, m in single)


def test_falcon_quantization_fix_is_reported():
    results = doctor.check_versions(load_config("reference"), "falcon")
    assert any(s == doctor.INFO and "falcon-qlora fixes this" in m for s, m in results)
    assert not any("fixes this" in m for _, m in doctor.check_versions(load_config("demo"), "llama"))


def test_too_little_disk_fails(monkeypatch, tmp_path):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**6, 10**6))
    results = doctor.check_memory_and_disk(load_config("reference", output_dir=str(tmp_path / "x" / "y")))
    [(status, msg)] = [r for r in results if r[1].startswith("disk:")]  # a GPU adds its memory line
    assert status == doctor.FAIL and "save_total_limit" in msg and str(tmp_path) in msg


def test_hub_check_is_quick_and_one_line_offline(monkeypatch):
    import time
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://10.255.255.1")  # unroutable: times out
    t = time.time()
    up, msg = doctor.hub_reachable(timeout=0.5)
    assert not up and "http://10.255.255.1" in msg and "\n" not in msg
    assert time.time() - t < 5


def test_memory_profile_reports_its_pinned_host_memory(monkeypatch, tmp_path):
    """The memory profile keeps each layer's input in pinned host RAM: doctor weighs that against the RAM available
    (Falcon-7B at 8 rows of 512: 32 layers x 8 x 512 x 4544 fp32, ~2.2 GiB) and warns when it would not fit."""
    cfg = load_config("reference", profile="memory", output_dir=str(tmp_path / "out"))
    import re
    line = next(m for s, m in doctor.check_memory_and_disk(cfg) if m.startswith("host memory"))
    layer_inputs = 32 * 8 * 512 * 4544 * 4 / 2**30  # 2.22 GiB; the final norm's input and rotary tables add a little
    assert layer_inputs <= float(re.search(r"~([\d.]+) GiB", line).group(1)) < 1.1 * layer_inputs
    pages = {"SC_AVPHYS_PAGES": 2**30 // 4096, "SC_PAGE_SIZE": 4096}  # 1 GiB available
    monkeypatch.setattr(doctor.os, "sysconf", lambda name: pages[name])
    status, line = next((s, m) for s, m in doctor.check_memory_and_disk(cfg) if m.startswith("host memory"))
    assert status == doctor.WARN and "profile=reference" in line


def test_doctor_shows_the_plan_a_run_would_take(tmp_path):
    """The same RunPlan train would make here: profile, why, and the split per device."""
    from falcon_qlora.plan import make_plan
    cfg = load_config("reference", profile="memory", output_dir=str(tmp_path / "out"))
    lines = [m for s, m in doctor.check_memory_and_disk(cfg) if m.startswith("plan: ")]
    assert lines == [f"plan: {make_plan(cfg).describe()}"]
    assert "profile memory (as configured); effective batch 16 rows = 8 per device x 2 accumulation" in lines[0]
