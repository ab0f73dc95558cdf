"""The Colab notebook runs top to bottom (headless, papermill) on the tiny Falcon, and its parameters cell holds
only real config keys."""
import ast
import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from falcon_qlora.config import field_names

NOTEBOOK = Path(__file__).parents[1] / "finetune_falcon_guanaco.ipynb"
NOT_CONFIG = {"prompt", "max_new_tokens"}


def parameters_cell():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    return "".join(tagged[0]["source"])


def test_parameters_cell_names_only_config_keys():
    names = {t.id for node in ast.parse(parameters_cell()).body for t in node.targets}
    assert names - NOT_CONFIG <= set(field_names())
    assert {"lora_r", "learning_rate", "max_steps", "model_name_or_path"} <= names


@pytest.mark.slow
def test_notebook_runs_headless_on_the_tiny_model(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("FALCON_QLORA_SKIP_INSTALL", "1")
    params = tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "run", max_steps=3, save_steps=3)
    params.update(prompt="what is two plus one?", max_new_tokens=8)
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, cwd=str(tmp_path), progress_bar=False)
    outputs = "".join(str(o) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []))
    assert "8 Linear4bit layers" in outputs and "trainable parameters" in outputs
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert "image/png" in outputs
    assert (tmp_path / "run" / "model-q8_0.gguf").read_bytes()[:4] == b"GGUF"   # the export cell
    assert "<iframe" in outputs and "/v1" in outputs       # the last cell shows the chat page inline


@pytest.mark.slow
def test_notebook_runs_with_the_embedded_smollm2(smollm2, tmp_path, monkeypatch):
    """The same notebook on a model that knows language: SmolLM2-135M (4-bit) on the embedded demo data."""
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("FALCON_QLORA_SKIP_INSTALL", "1")
    params = dict(model_name_or_path=str(smollm2), dataset_name="demo-guanaco", output_dir=str(tmp_path / "run"),
                  lora_target_modules=["q_proj", "v_proj"], lora_r=4, max_length=96, max_steps=2, save_steps=2,
                  logging_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  gradient_checkpointing=False, optim="adamw_torch", compute_dtype="fp32", max_train_rows=8,
                  max_eval_rows=4, per_device_eval_batch_size=4, warmup_ratio=0.0,
                  prompt="Make a contact card for Ana Silva, a 30-year-old nurse from Lima.",
                  max_new_tokens=8)
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, cwd=str(tmp_path), progress_bar=False)
    outputs = "".join(str(o) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []))
    assert "210 Linear4bit layers" in outputs and "trainable parameters" in outputs
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_the_parameters_cell_is_the_config_with_its_own_help():
    """Every config key at its reference default with the config's help as its comment, then the notebook's own
    few names: the cell cannot drift from the config."""
    import json
    from falcon_qlora.config import notebook_parameters
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    [cell] = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    source = "".join(cell["source"])
    assert source.startswith(notebook_parameters() + "\n# Notebook only:")


def test_the_install_cell_without_a_checkout_stops_in_one_line_naming_what_to_set(tmp_path, monkeypatch):
    """Opened in Colab without the repository, the notebook installs from PACKAGE or stops at once; it never
    guesses a repository address."""
    import json
    import pytest
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    source = "".join(nb["cells"][1]["source"])
    assert "github.com/" not in source.replace("github.com/YOU/", "")
    monkeypatch.chdir(tmp_path)  # no pyproject.toml here
    monkeypatch.delenv("FALCON_QLORA_PACKAGE", raising=False)
    monkeypatch.delenv("FALCON_QLORA_SKIP_INSTALL", raising=False)
    with pytest.raises(SystemExit, match="set PACKAGE in this cell") as stop:
        exec(compile(source, "install-cell", "exec"), {})
    assert "\n" not in str(stop.value)


def test_on_a_t4_the_preset_fills_only_what_was_left_at_the_default():
    from falcon_qlora.config import RunConfig, from_namespace, notebook_parameters
    namespace = {}
    exec(notebook_parameters(), namespace)  # the parameters cell as shipped: the reference recipe
    namespace["save_total_limit"] = 5       # one value the user changed
    cfg = from_namespace(namespace, preset="colab-t4")
    assert (cfg.compute_dtype, cfg.profile, cfg.save_steps) == ("fp16", "memory", 50)  # the preset's
    assert cfg.save_total_limit == 5 and cfg.lora_r == RunConfig().lora_r            # the user's, the recipe's
    assert from_namespace(namespace) == RunConfig(**{**RunConfig().__dict__, "save_total_limit": 5})
