"""Security: no code from a model folder runs unless asked, no pickle weights unless allowed, no credential in any
file of the run directory, and nothing written outside the output directory."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_overrides, train_argv

TOKENS = {"HF_TOKEN": "hf_PlantedTokenDoNotLeak0123456789",
          "HUGGING_FACE_HUB_TOKEN": "hf_OtherPlantedToken9876543210",
          "WANDB_API_KEY": "wandbPlantedKey0123456789abcdef0123456789"}


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_trust_remote_code_is_off_unless_set(tiny_falcon_7b_arch, tmp_path, monkeypatch):
    """A model folder that ships its own modeling code (auto_map) gets the native Falcon class by default; the
    shipped code runs only with trust_remote_code=true."""
    from falcon_qlora.config import RunConfig, load_config, make_config
    from falcon_qlora.model import load_base_model
    assert RunConfig.__dataclass_fields__["trust_remote_code"].default is False
    assert load_config("reference").trust_remote_code is False
    folder = _copy_model(tiny_falcon_7b_arch, tmp_path / "shipped-code")
    marker = tmp_path / "remote-code-ran"
    (folder / "evil_modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import FalconForCausalLM\n\n\nclass EvilFalcon(FalconForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.EvilFalcon"}
    (folder / "config.json").write_text(json.dumps(config))
    over = tiny_overrides(folder, folder, tmp_path / "out")
    load_base_model(make_config(**over))
    assert not marker.exists()
    from transformers import AutoModelForCausalLM
    mapping = AutoModelForCausalLM._model_mapping  # loading registers EvilFalcon for Falcon: undo after the test
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    load_base_model(make_config(**over, trust_remote_code=True))
    assert marker.read_text() == "ran"  # the switch is really wired through


@pytest.fixture(scope="module")
def pickle_model(tiny_falcon_7b_arch, tmp_path_factory) -> Path:
    """The tiny Falcon with its weights as pytorch_model.bin (a pickle) instead of safetensors."""
    import torch
    from safetensors.torch import load_file
    folder = _copy_model(tiny_falcon_7b_arch, tmp_path_factory.mktemp("pk") / "falcon-bin")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused(pickle_model, tiny_data, tmp_path, capsys):
    from falcon_qlora.cli import main
    code = main(train_argv(pickle_model, tiny_data, tmp_path / "run"))
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert f"{pickle_model} has no .safetensors weights" in line and "allow_pickle=true" in line


def test_pickle_weights_load_when_allowed(pickle_model, tmp_path):
    from falcon_qlora.config import make_config
    from falcon_qlora.model import count_linear4bit, load_base_model
    model = load_base_model(make_config(**tiny_overrides(pickle_model, pickle_model, tmp_path, allow_pickle=True)))
    assert count_linear4bit(model) == 8  # 4 linears x 2 layers, really in 4-bit


def test_planted_tokens_never_reach_the_run_dir(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch, capsys):
    """Tokens in the environment -- and even a token handed to the trainer's arguments, as a hub upload would --
    appear in no file of the run directory (configs, logs, checkpoints, training_args.bin) and not in the output."""
    import falcon_qlora.train as T
    from falcon_qlora.cli import main
    from falcon_qlora.safety import files_with_secrets, secret_values
    for k, v in TOKENS.items():
        monkeypatch.setenv(k, v)
    assert set(TOKENS.values()) <= set(secret_values())
    real = T.sft_config

    def with_token(*a, **k):
        args = real(*a, **k)
        args.hub_token = TOKENS["HF_TOKEN"]
        return args
    monkeypatch.setattr(T, "sft_config", with_token)
    out = tmp_path / "run"
    assert main(train_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=2, save_steps=1)) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and len(files) > 20
    assert files_with_secrets(out, list(TOKENS.values())) == []
    printed = "".join(capsys.readouterr())
    assert not any(v in printed for v in TOKENS.values())


def test_planted_token_scan_finds_a_leak(tmp_path):
    """The scanner used above does find a token written as text or inside a pickle."""
    import torch
    from falcon_qlora.safety import files_with_secrets
    (tmp_path / "ok.txt").write_text("nothing here")
    torch.save({"hub_token": TOKENS["HF_TOKEN"]}, tmp_path / "training_args.bin")
    assert files_with_secrets(tmp_path, [TOKENS["HF_TOKEN"]]) == [tmp_path / "training_args.bin"]


@pytest.mark.parametrize("name", ["final", "checkpoint-2", "runs", "wandb", "hub-someone--tiny"])
def test_output_paths_cannot_escape_the_output_dir(name, tiny_falcon_7b_arch, tiny_data, tmp_path, capsys):
    """An entry falcon-qlora or its loggers write through (`final`, `checkpoint-N`, tensorboard's `runs`, W&B's
    `wandb`, a hub folder) that links outside the output dir is refused before anything is written through it."""
    from falcon_qlora.cli import main
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(elsewhere, target_is_directory=True)
    code = main(train_argv(tiny_falcon_7b_arch, tiny_data, out, overwrite=True))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"{out / name} resolves to {elsewhere}, outside the output directory" in line, line
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]


def test_inside_rejects_dotdot_and_accepts_children(tmp_path):
    from falcon_qlora.errors import UserError
    from falcon_qlora.guards import inside
    assert inside(tmp_path, "final") == tmp_path / "final"
    assert inside(tmp_path, "a/../b") == tmp_path / "a/../b"
    for bad in ("../x", "final/../../x", "/etc/passwd"):
        with pytest.raises(UserError, match="outside the output directory"):
            inside(tmp_path, bad)


HIDDEN = (".staging-final", ".staging-checkpoint-1", ".staging-checkpoint-2", ".trash-checkpoint-1", ".trash-final")


def test_planted_links_on_hidden_names_are_replaced_not_followed(tiny_falcon_7b_arch, tiny_data, tmp_path, capsys):
    """Links named like falcon-qlora's staging and trash folders, planted before a run that saves, rotates and
    replaces final/, are removed (not followed): the run succeeds and nothing lands where they pointed."""
    from falcon_qlora.cli import main
    out, targets = tmp_path / "run", {}
    out.mkdir()
    (out / "final").mkdir()  # an earlier final/, moved to .trash-final when the new one is published
    for name in HIDDEN:
        targets[name] = tmp_path / f"elsewhere{name}"
        targets[name].mkdir()
        (out / name).symlink_to(targets[name], target_is_directory=True)
    code = main(train_argv(tiny_falcon_7b_arch, tiny_data, out, max_steps=2, save_steps=1, save_total_limit=1,
                      eval_split=None))
    assert code == 0, capsys.readouterr().err[-2000:]
    assert all(list(t.iterdir()) == [] for t in targets.values())
    assert not any(os.path.lexists(out / name) for name in HIDDEN)
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final").is_symlink()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


@pytest.mark.parametrize("step", ["atomic_dir", "publish", "rotate"])
def test_each_write_step_replaces_a_link_it_finds(step, tmp_path):
    """The same at the moment of writing (a link appearing after the run started): the staging folder, the trash
    name used to replace a folder, and the trash name used to rotate a checkpoint are made fresh."""
    import json
    from falcon_qlora import checkpoints as C
    out, away = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    away.mkdir()
    if step == "atomic_dir":
        (out / ".staging-final").symlink_to(away, target_is_directory=True)
        with C.atomic_dir(out / "final") as tmp:
            (tmp / "adapter_model.safetensors").write_text("w")
    else:
        for n in (1, 2):
            ck = out / f"checkpoint-{n}"
            ck.mkdir()
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": n}))
            (ck / "adapter_model.safetensors").write_text("w")
        (out / ".trash-checkpoint-1").symlink_to(away, target_is_directory=True)
        if step == "publish":
            new = out / "new"
            new.mkdir()
            C.publish(new, out / "checkpoint-1")
        else:
            C.rotate(out, keep=1)
    assert list(away.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == {"atomic_dir": ["final"], "publish": ["checkpoint-1", "checkpoint-2"],
                                                      "rotate": ["checkpoint-2"]}[step]


def test_wandb_writes_under_the_output_dir(tmp_path, monkeypatch):
    """W&B's run folder goes under output_dir (it defaults to the current directory), unless WANDB_DIR is set."""
    from falcon_qlora.config import make_config
    from falcon_qlora.train import wandb_env
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_env(make_config(output_dir=str(tmp_path / "run")))
    assert os.environ["WANDB_DIR"] == str((tmp_path / "run").resolve())
    wandb_env(make_config(output_dir=str(tmp_path / "run2")))  # a second run in the same process moves it along
    assert os.environ["WANDB_DIR"] == str((tmp_path / "run2").resolve())
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    wandb_env(make_config(output_dir=str(tmp_path / "run3")))
    assert os.environ["WANDB_DIR"] == str(tmp_path / "mine")


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_unreachable_wandb_falls_back_to_offline_in_seconds(how, tmp_path, monkeypatch, capsys):
    """With a W&B key but no service (a refused connection, or one that never answers), the run logs offline after
    at most a few seconds and says so in one line, instead of wandb's ~100 s of retries and a traceback."""
    import socket
    import time
    import falcon_qlora.train as T
    from falcon_qlora.config import make_config
    monkeypatch.setenv("WANDB_API_KEY", TOKENS["WANDB_API_KEY"])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    if how == "silent":
        monkeypatch.setattr(T, "WANDB_PROBE_SECONDS", 0.5)
        silent = SimpleNamespace(close=lambda: None)  # what a connection that finally succeeds returns
        monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (time.sleep(5), silent)[1])
    start = time.monotonic()
    T.wandb_env(make_config(output_dir=str(tmp_path), report_to="wandb"))
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert os.environ["WANDB_MODE"] == "offline"
    assert len(err) == 1 and {"refused": "is unreachable (", "silent": "did not answer within 0.5 s"}[how] in err[0], err
    assert f"wandb sync {tmp_path.resolve()}/wandb/" in err[0] and TOKENS["WANDB_API_KEY"] not in err[0]
