"""merge: dequantize the 4-bit base, merge, check logits before writing; a plain transformers folder; idempotent."""
from __future__ import annotations

import pytest

from falcon_qlora.errors import UserError
from falcon_qlora.merge import CHECK_TEXTS, merge
from falcon_qlora.template import GUANACO_TEMPLATE
from tiny import logits

TEXT = "### Human: what is four plus one? ### Assistant: four plus one is five."


@pytest.fixture(scope="module")
def merged(tiny_adapter, tmp_path_factory):
    return merge(tiny_adapter, tmp_path_factory.mktemp("m") / "merged")


def test_merged_folder_loads_with_plain_transformers_and_matches(merged, tiny_adapter):
    import json
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from falcon_qlora.model import load_adapter_model
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert "base_model:" in (merged / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == GUANACO_TEMPLATE  # the merged model carries the prompt format it was trained in
    ref_model, ref_tok, _ = load_adapter_model(tiny_adapter)  # the 4-bit base + adapter, as trained
    ref = logits(ref_model, ref_tok, TEXT)
    assert ((logits(plain, tok, TEXT) - ref).norm() / ref.norm()).item() < 1e-5
    assert TEXT not in CHECK_TEXTS  # an input the pre-write check did not see


def test_merging_into_nf4_layers_would_be_far_less_exact(tiny_adapter, merged):
    """Why merge dequantizes first: peft's merge into the 4-bit layers re-quantizes base + update, rounding it."""
    from transformers import AutoModelForCausalLM
    from falcon_qlora.model import load_adapter_model
    model, tok, _ = load_adapter_model(tiny_adapter)
    ref = logits(model, tok, TEXT)
    ours = logits(AutoModelForCausalLM.from_pretrained(merged), tok, TEXT)
    naive = logits(model.merge_and_unload(), tok, TEXT)
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


def test_the_check_runs_in_fp32_and_is_far_below_its_tolerance(merged):
    import json
    from falcon_qlora.merge import MARKER, TOLERANCE
    err = json.loads((merged / MARKER).read_text())["max_relative_logit_error"]
    assert err < TOLERANCE / 100


def _wrong_merge(monkeypatch, wrong):
    import falcon_qlora.merge as M
    right = M.merged_model
    monkeypatch.setattr(M, "merged_model", lambda base_model, adapter: wrong(right, base_model, adapter))


def test_an_adapter_merged_at_twice_its_scale_is_refused(tiny_adapter, tmp_path, monkeypatch):
    def doubled(right, base_model, adapter):
        import torch
        from peft import PeftModel
        base_model.dequantize(dtype=torch.float32)
        model = PeftModel.from_pretrained(base_model, str(adapter))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data *= 2
        return model.merge_and_unload().float().eval()
    _wrong_merge(monkeypatch, doubled)
    with pytest.raises(UserError, match="merge is wrong, nothing was written"):
        merge(tiny_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_merged_into_another_base_of_the_same_shape_is_refused(tiny_adapter, tmp_path, monkeypatch):
    from tiny import build_falcon
    from falcon_qlora.config import load_config
    from falcon_qlora.model import load_base_model
    other = build_falcon(tmp_path / "other", new_decoder_architecture=False, seed=1)
    _wrong_merge(monkeypatch, lambda right, base_model, adapter: right(
        load_base_model(load_config(model_name_or_path=str(other), compute_dtype="fp32")), adapter))
    with pytest.raises(UserError, match="merge is wrong"):
        merge(tiny_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ a base of the same shapes, other weights
@pytest.fixture(scope="module")
def other_seed(tmp_path_factory):
    """The 7B-style tiny Falcon again, same shapes and tokenizer, other random weights (seed 1)."""
    from tiny import build_falcon
    return build_falcon(tmp_path_factory.mktemp("seed1"), new_decoder_architecture=False, seed=1)


def test_fingerprint_tells_same_shaped_bases_apart(tiny_adapter, tiny_falcon_7b_arch, other_seed, tmp_path):
    """What train recorded equals what is computed at load time; a copy matches, another seed does not."""
    import json
    import shutil
    from falcon_qlora.model import base_fingerprint
    from falcon_qlora.rundir import FINGERPRINT as FINGERPRINT_FILE
    recorded = json.loads((tiny_adapter / FINGERPRINT_FILE).read_text())
    assert recorded == {"base": str(tiny_falcon_7b_arch), "fingerprint": base_fingerprint(str(tiny_falcon_7b_arch))}
    assert base_fingerprint(str(shutil.copytree(tiny_falcon_7b_arch, tmp_path / "copy"))) == recorded["fingerprint"]
    assert base_fingerprint(str(other_seed)) != recorded["fingerprint"]
    assert (tiny_adapter.parent / FINGERPRINT_FILE).is_file()


def test_chat_and_eval_warn_in_one_line_on_another_base(tiny_adapter, tiny_falcon_7b_arch, other_seed, capsys):
    from falcon_qlora.model import load_adapter_model
    load_adapter_model(tiny_adapter, base=str(tiny_falcon_7b_arch))
    assert "warning" not in capsys.readouterr().err
    model, _, _ = load_adapter_model(tiny_adapter, base=str(other_seed))  # a deliberate --base still loads
    warned = [x for x in capsys.readouterr().err.splitlines() if "falcon-qlora: warning:" in x]
    assert len(warned) == 1 and f"{other_seed} is not the base this adapter was trained on" in warned[0]
    assert str(tiny_falcon_7b_arch) in warned[0] and model is not None


def test_merge_refuses_another_base_unless_allowed(tiny_adapter, other_seed, tmp_path, capsys):
    from falcon_qlora.merge import cli
    with pytest.raises(UserError) as err:
        merge(tiny_adapter, tmp_path / "m", base=str(other_seed))
    assert "\n" not in str(err.value) and "--allow_other_base" in str(err.value)
    assert f"{other_seed} is not the base this adapter was trained on" in str(err.value)
    assert not (tmp_path / "m").exists()
    assert cli(["--adapter", str(tiny_adapter), "--out", str(tmp_path / "m"), "--base", str(other_seed),
                "--allow_other_base"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file() and "warning" in capsys.readouterr().err
