"""export: a merged model as GGUF, read back by readers we did not write (transformers' GGUF loader, llama.cpp).

Tolerances: an f32 file holds the merged weights bit for bit, so transformers' reader must reproduce the merged
model's logits to float32 round-off (1e-5 relative). f16 rounds every weight to 11 significant bits (relative
error <= 2**-11 = 4.9e-4 each); over a few layers that gives ~1e-3 on the logits (SmolLM2, 30 layers: 1.1e-3
measured), so f16 is held to 5e-3. llama.cpp computes with its own kernels (different summation order and, for
matmuls, f16 activations on the CPU), hence 1e-2 there, plus the requirement that every argmax agrees.
"""
from __future__ import annotations

import shutil

import pytest

from falcon_qlora import llamacpp
from falcon_qlora.errors import UserError
from falcon_qlora.export import export
from tiny import logits

TEXT = "### Human: what is three plus one? ### Assistant: three plus one is four."
needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp is not installed (falcon-qlora[gguf])")


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _gguf_model(path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged_tiny(tiny_adapter):
    from falcon_qlora.merge import checked_merge
    model, tok, *_ = checked_merge(tiny_adapter, "fp32")
    return model, tok


@pytest.mark.parametrize("quant,tol", [("f32", 1e-5), ("f16", 5e-3)])
def test_adapter_export_reads_back_through_transformers_and_matches_the_merged_model(
        quant, tol, tiny_adapter, merged_tiny, tmp_path):
    """The 7B-layout tiny Falcon + a trained adapter -> GGUF -> transformers' own GGUF loader: same logits."""
    model, tok = merged_tiny
    out = export(tiny_adapter, tmp_path / "tiny.gguf", quant=quant)
    got = logits(_gguf_model(out), tok, TEXT)
    assert _rel(got, logits(model, tok, TEXT)) < tol
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.Modelfile", "tiny.gguf"]   # no temporary left


def test_the_file_carries_tokenizer_merges_specials_and_the_guanaco_template(tiny_adapter, merged_tiny, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer
    _, tok = merged_tiny
    out = export(tiny_adapter, tmp_path / "t.gguf", quant="q8_0")
    fields = GGUFReader(out).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"].contents() == tok.pad_token_id != tok.eos_token_id
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    assert "### Human: " in fields["tokenizer.chat_template"].contents()   # trained on Guanaco text: its template
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert back(TEXT).input_ids == tok(TEXT).input_ids


def test_a_bf16_model_folder_exports_the_same_file_as_its_fp32_copy(tiny_falcon, tmp_path):
    """A model folder loads in its saved dtype (half the host memory for bf16): the file must not change."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_falcon)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())   # values a bf16 folder holds exactly
    outs = []
    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype).split(".")[1] / "model"   # same folder name: the file's name field matches
        model.to(dtype).save_pretrained(folder)
        tok.save_pretrained(folder)
        outs.append(export(model=folder, out=folder.parent / "m.gguf", quant="q8_0"))
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_both_falcon_layouts_export_with_their_kv_heads_and_norms(tiny_falcon, tmp_path):
    """Both decoder layouts export; the 40B layout's head_count_kv is its number of KV groups."""
    from gguf import GGUFReader
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(tiny_falcon)
    out = export(model=tiny_falcon, out=tmp_path / "f.gguf", quant="f16")
    fields = GGUFReader(out).fields
    assert fields["falcon.attention.head_count_kv"].contents() == (cfg.num_kv_heads if cfg.new_decoder_architecture
                                                                   else 1)
    names = {t.name for t in GGUFReader(out).tensors}
    assert ("blk.0.attn_norm_2.weight" in names) == cfg.new_decoder_architecture   # 40B: two layer norms


@needs_llamacpp
def test_llama_cpp_runs_both_falcon_layouts_with_the_logits_of_transformers(tiny_falcon, tmp_path):
    """llama.cpp itself reads the regrouped query_key_value of both layouts: same logits as transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref = AutoModelForCausalLM.from_pretrained(tiny_falcon, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_falcon)
    out = export(model=tiny_falcon, out=tmp_path / "f.gguf", quant="f32")
    ids = tok(TEXT).input_ids
    with llamacpp.Model(out) as m:
        assert m.tokenize(TEXT) == ids    # llama.cpp's BPE on the exported vocabulary and merges
        got = torch.from_numpy(m.logits(ids))
    want = logits(ref, tok, TEXT)[0]
    assert _rel(got, want) < 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_llamacpp
def test_k_quant_goes_through_llama_cpp_and_still_runs(tiny_falcon_7b_arch, tmp_path):
    from gguf import GGUFReader
    out = export(model=tiny_falcon_7b_arch, out=tmp_path / "f.gguf", quant="q4_0")
    assert GGUFReader(out).fields["general.file_type"].contents() == llamacpp.FTYPES["q4_0"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # the f16 intermediate is gone
    (text, _), = llamacpp.greedy(out, ["### Human: what is two plus two? ### Assistant:"], max_new_tokens=4)
    assert isinstance(text, str)


@pytest.mark.slow
def test_smollm2_round_trips_through_transformers_and_keeps_its_chatml_template(smollm2, tmp_path):
    """The embedded SmolLM2 (Llama architecture: q/k rows permuted for llama.cpp's rotary layout, and back)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = export(model="smollm2-135m", out=tmp_path / "smol.gguf", quant="f16")
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert back(TEXT).input_ids == tok(TEXT).input_ids
    assert _rel(logits(_gguf_model(out), tok, TEXT), logits(ref, tok, TEXT)) < 5e-3
    modelfile = (tmp_path / "smol.Modelfile").read_text()
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    if llamacpp.available():   # and llama.cpp decodes exactly what transformers decodes
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt").input_ids
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        with llamacpp.Model(out) as m:
            assert m.tokenize(prompt) == ids[0].tolist()
            got, _ = m.greedy(ids[0].tolist(), 12)
        assert got == want[:len(got)] and len(got) >= 6


# Bad input: one line each, before any work, and nothing written.

def test_unknown_quant_type(tiny_adapter, tmp_path):
    with pytest.raises(UserError, match="unknown --quant 'q9'.*q4_k_m"):
        export(tiny_adapter, tmp_path / "m.gguf", quant="q9")


def test_missing_adapter(tmp_path):
    with pytest.raises(UserError, match="adapter folder .*nope does not exist"):
        export(tmp_path / "nope", tmp_path / "m.gguf")


def test_existing_output_is_kept_without_force(tiny_falcon_7b_arch, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        export(model=tiny_falcon_7b_arch, out=out)
    assert out.read_text() == "mine"
    export(model=tiny_falcon_7b_arch, out=out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_alibi_falcon_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    from transformers import FalconConfig
    import falcon_qlora.export as ex
    FalconConfig(alibi=True, parallel_attn=False, bias=True, new_decoder_architecture=False,
                 hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path / "rw")
    monkeypatch.setattr(ex, "_load_model", lambda *a: pytest.fail("weights were loaded"))
    with pytest.raises(UserError, match="ALiBi.*llama.cpp"):
        export(model=tmp_path / "rw", out=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_too_little_disk_is_refused_with_the_estimate(tiny_falcon_7b_arch, tmp_path, monkeypatch):
    import falcon_qlora.export as ex
    real = shutil.disk_usage
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UserError, match="needs about .* GiB"):
        export(model=tiny_falcon_7b_arch, out=tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_estimate_is_the_written_size(tiny_falcon_7b_arch, tmp_path):
    from transformers import AutoModelForCausalLM
    from falcon_qlora.export import estimate_bytes
    from falcon_qlora.gguf_file import tensor_plan
    out = export(model=tiny_falcon_7b_arch, out=tmp_path / "m.gguf", quant="q8_0")
    model = AutoModelForCausalLM.from_pretrained(tiny_falcon_7b_arch)
    tensors = sum(t.nbytes for t in tensor_plan(model.config, model.state_dict(), "q8_0"))
    final, need = estimate_bytes(model.config, "q8_0")
    assert tensors < out.stat().st_size <= final == need   # the tensors plus metadata, never above the estimate


def test_a_failure_while_writing_leaves_nothing_behind(tiny_falcon_7b_arch, tmp_path, monkeypatch):
    import falcon_qlora.gguf_file as gf
    real = gf.write

    def broken(path, *a, **k):
        real(path, *a, **k)
        raise OSError("disk full")
    monkeypatch.setattr(gf, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        export(model=tiny_falcon_7b_arch, out=tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_k_quant_without_llama_cpp_names_the_extra(tiny_falcon_7b_arch, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # import fails as if not installed
    with pytest.raises(UserError, match=r"falcon-qlora\[gguf\]"):
        export(model=tiny_falcon_7b_arch, out=tmp_path / "m.gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from falcon_qlora.cli import main
    assert main(["export", "--adapter", str(tmp_path / "x"), "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("falcon-qlora export: error:") and "\n" not in err


# The Modelfile's TEMPLATE: Ollama's Go template, derived from the Jinja one.

def test_guanaco_go_template_renders_what_chat_builds(tiny_adapter, merged_tiny):
    """The Ollama template gives the exact prompt `falcon-qlora chat` gives the model."""
    from falcon_qlora.chat import build_prompt
    from falcon_qlora.modelfile import go_template, render_go
    from falcon_qlora.template import GUANACO_TEMPLATE
    _, tok = merged_tiny
    go, system = go_template(tok, GUANACO_TEMPLATE)
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "what is two plus two?"}]
    assert system is None
    assert render_go(go, convo, None) == build_prompt([("hi", "hello")], "what is two plus two?")


def test_a_template_that_is_not_per_turn_is_refused_in_one_line(merged_tiny):
    from falcon_qlora.modelfile import go_template
    _, tok = merged_tiny
    odd = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(UserError, match="TEMPLATE by hand"):
        go_template(tok, odd)


def test_modelfile_points_at_the_file_and_stops_at_the_next_human_turn(tiny_adapter, tmp_path):
    export(tiny_adapter, tmp_path / "m.gguf", quant="f16")
    text = (tmp_path / "m.Modelfile").read_text()
    assert text.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "### Human:"' in text


@pytest.mark.parametrize("name,written", [("tiiuae/falcon-7b", 4_856_041_504), ("smollm2-135m", 105_453_824)])
def test_the_k_quant_estimate_covers_what_llama_cpp_writes(name, written):
    """Sizes of the q4_k_m files llama.cpp wrote (bench/raw/cpu_export_7b_q4.json, gguf_demo_llamacpp.json): the
    disk check must not ask for less, nor for much more. Both models have rows that k-quants cannot block."""
    from falcon_qlora.export import estimate_bytes
    from falcon_qlora.memory import model_config
    estimate = estimate_bytes(model_config(name), "q4_k_m")[0]
    assert written <= estimate <= 1.10 * written
