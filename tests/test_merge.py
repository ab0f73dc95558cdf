"""merge: dequantize the 4-bit base, merge, check logits before writing; a plain transformers folder; idempotent."""
from __future__ import annotations

import pytest

from falcon_qlora.errors import UserError
from falcon_qlora.merge import CHECK_TEXTS, merge

TEXT = "### Human: what is four plus one? ### Assistant: four plus one is five."


@pytest.fixture(scope="module")
def merged(tiny_adapter, tmp_path_factory):
    return merge(tiny_adapter, tmp_path_factory.mktemp("m") / "merged")


def _logits(model, tok, text=TEXT):
    import torch
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits.float()


def test_merged_folder_loads_with_plain_transformers_and_matches(merged, tiny_adapter):
    import json
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from falcon_qlora.model import load_adapter_model
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert "base_model:" in (merged / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    ref_model, ref_tok, _ = load_adapter_model(tiny_adapter)  # the 4-bit base + adapter, as trained
    ref = _logits(ref_model, ref_tok)
    assert ((_logits(plain, tok) - ref).norm() / ref.norm()).item() < 1e-5
    assert TEXT not in CHECK_TEXTS  # an input the pre-write check did not see


def test_merging_into_nf4_layers_would_be_far_less_exact(tiny_adapter, merged):
    """Why merge dequantizes first: peft's merge into the 4-bit layers re-quantizes base + update, rounding it."""
    from transformers import AutoModelForCausalLM
    from falcon_qlora.model import load_adapter_model
    model, tok, _ = load_adapter_model(tiny_adapter)
    ref = _logits(model, tok)
    ours = _logits(AutoModelForCausalLM.from_pretrained(merged), tok)
    naive = _logits(model.merge_and_unload(), tok)
    assert (naive - ref).norm() > 100 * (ours - ref).norm()


def test_second_merge_is_a_no_op(merged, tiny_adapter, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in merged.iterdir()}
    assert merge(tiny_adapter, merged) == merged
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in merged.iterdir()} == before


def test_refuses_a_non_empty_foreign_folder(tiny_adapter, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge(tiny_adapter, tmp_path)
