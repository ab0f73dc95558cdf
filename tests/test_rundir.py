"""The run directory: one place knows every path of a run, and loads the run config saved with an adapter."""
from __future__ import annotations

import pytest

from falcon_qlora.config import ConfigError, load_config
from falcon_qlora.rundir import RunDir, load_run_config, run_of, save_run_config, staging_of, step_of


def test_every_path_of_a_run(tmp_path):
    run = RunDir(tmp_path)
    assert (run.final, run.run_config, run.versions, run.fingerprint) == (
        tmp_path / "final", tmp_path / "run_config.yaml", tmp_path / "versions.json",
        tmp_path / "base_fingerprint.json")
    assert (run.metrics, run.loss_plot, run.demo_plot, run.card, run.eval) == (
        tmp_path / "metrics.jsonl", tmp_path / "loss.png", tmp_path / "demo_loss.png", tmp_path / "README.md",
        tmp_path / "eval.json")
    assert run.checkpoint(12) == tmp_path / "checkpoint-12" and step_of(run.checkpoint(12)) == 12
    assert run.hub_folder("me/tiny") == tmp_path / "hub-me--tiny"
    assert staging_of(run.final) == tmp_path / ".staging-final"


def test_written_names_include_the_checkpoint_and_hub_folders_on_disk(tmp_path):
    for name in ("checkpoint-3", "hub-me--tiny", "notes"):
        (tmp_path / name).mkdir()
    names = RunDir(tmp_path).written_names()
    assert {"final", "run_config.yaml", "loss.png", "wandb", "checkpoint-3", "hub-me--tiny"} <= set(names)
    assert "notes" not in names


def test_a_saved_folder_knows_its_run(tmp_path):
    assert run_of(tmp_path / "final") == tmp_path
    assert run_of(tmp_path / "checkpoint-4") == tmp_path
    assert run_of(tmp_path / "checkpoint-4.damaged") is None and run_of(tmp_path / "merged") is None


def test_run_config_beside_an_adapter_loads_with_overrides(tmp_path):
    save_run_config(load_config("demo", max_steps=7), tmp_path)
    cfg = load_run_config(tmp_path, compute_dtype="fp32")
    assert (cfg.max_steps, cfg.compute_dtype) == (7, "fp32")
    assert cfg.model_name_or_path == load_config("demo").model_name_or_path


def test_a_bare_adapter_gets_the_defaults(tmp_path):
    assert load_run_config(tmp_path, lora_r=4) == load_config(None, lora_r=4)


def test_a_run_config_that_does_not_load_is_one_error_naming_the_file(tmp_path):
    (tmp_path / "run_config.yaml").write_text("max_steps: 5\nno_such_key: 1\n")
    with pytest.raises(ConfigError, match=r"run_config\.yaml \(the run config saved with this folder\) does not load"
                                          r".*no_such_key"):
        load_run_config(tmp_path)


def test_a_run_config_that_is_not_yaml_is_the_same_error(tmp_path):
    (tmp_path / "run_config.yaml").write_text("max_steps: [\n")
    with pytest.raises(ConfigError, match=r"run_config\.yaml \(the run config saved with this folder\) does not load: "
                                          r"it is not valid YAML"):
        load_run_config(tmp_path)
