"""publish: the hub folder and model card are complete and load back; without a hub the failure is one line."""
from __future__ import annotations

import pytest

from falcon_qlora.errors import UserError
from falcon_qlora.publish import build_hub_folder, publish, upload


def test_adapter_folder_has_card_and_loads_back(tiny_adapter, tmp_path):
    import torch
    from falcon_qlora.model import load_adapter_model
    folder = build_hub_folder(tiny_adapter, tmp_path / "hub", repo_id="me/tiny-qlora")
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.yaml",
            "README.md"} <= names
    assert "training_args.bin" not in names  # pickles stay home
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "| lora_r | 8 |" in card and "held-out loss:" in card  # recipe and the run's final eval
    a, tok, _ = load_adapter_model(tiny_adapter)
    b, _, _ = load_adapter_model(folder)
    ids = tok("### Human: hi ### Assistant:", return_tensors="pt").to(next(a.parameters()).device)
    with torch.no_grad():
        assert torch.equal(a(**ids).logits, b(**ids).logits)


def test_offline_push_is_one_line_naming_the_folder(tiny_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        publish(tiny_adapter, "me/tiny-qlora")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "hf upload me/tiny-qlora" in msg
    assert (tiny_adapter.parent / "hub-me--tiny-qlora" / "README.md").is_file()  # built before the upload


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}",
                        raising=False)
    with pytest.raises(UserError, match="push to me/x failed") as err:
        upload(tmp_path, "me/x")
    assert "\n" not in str(err.value) and "hf_dummy" not in str(err.value)


def test_merged_folder_card(tiny_adapter, tmp_path):
    from falcon_qlora.merge import merge
    merged = merge(tiny_adapter, tmp_path / "merged")
    folder = build_hub_folder(merged, tmp_path / "hub")
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "merged" in card
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
