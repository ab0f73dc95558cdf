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


def test_notebook_runs_headless_on_the_tiny_model(tiny_falcon_7b_arch, tiny_data, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("FALCON_QLORA_SKIP_INSTALL", "1")
    params = tiny_overrides(tiny_falcon_7b_arch, tiny_data, tmp_path / "run", max_steps=3, save_steps=3)
    params.update(prompt="### Human: what is two plus one? ### Assistant:", max_new_tokens=8)
    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, cwd=str(tmp_path), progress_bar=False)
    outputs = "".join(str(o) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []))
    assert "8 Linear4bit layers" in outputs and "trainable parameters" in outputs
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert "image/png" in outputs
