"""llama.cpp itself, through the prebuilt CPU library of the PyPI package `llama-cpp-py-sync` (the `gguf` extra):
k-quantization of an exported GGUF, and running one (logits, greedy decoding) to check what was exported.

    from falcon_qlora import llamacpp
    llamacpp.quantize("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m")
    llamacpp.greedy("model-q4_k_m.gguf", ["### Human: hi ### Assistant:"])   # [(text, stopped_at_eos)]

The package ships libllama built from upstream llama.cpp (no compiler needed); nothing here re-implements a kernel.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

EXTRA = 'pip install "falcon-qlora[gguf]"'
PACKAGE = "llama-cpp-py-sync"
# llama.cpp's own file types (enum llama_ftype in llama.h), as llama-quantize names them.
FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
          "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
# Bits per weight of each, as llama-quantize reports them for 7B models: for the disk estimate only.
BITS = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q2_k": 3.4, "q3_k_s": 3.5, "q3_k_m": 3.9,
        "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.9, "q5_k_s": 5.5, "q5_k_m": 5.7, "q6_k": 6.6}
_quiet = None   # the log callback must outlive every call into the library


def _lib():
    """(ffi, lib) of the bundled libllama, with its logging silenced; a one-line error naming the extra if absent."""
    global _quiet
    try:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib
    except ImportError:
        raise UserError(f"this needs llama.cpp, which falcon-qlora takes from the package {PACKAGE}: run `{EXTRA}` "
                        "(a prebuilt CPU library, no compiler needed)") from None
    ffi, lib = get_ffi(), get_lib()
    if _quiet is None and not os.environ.get("FALCON_QLORA_LLAMA_LOG"):
        _quiet = ffi.callback("ggml_log_callback", lambda level, text, data: None)
        lib.llama_log_set(_quiet, ffi.NULL)
    lib.llama_backend_init()
    return ffi, lib


def available() -> bool:
    try:
        _lib()
    except UserError:
        return False
    return True


def version() -> str:
    from llama_cpp_py_sync import __llama_cpp_tag__, __version__
    return f"{PACKAGE} {__version__} (llama.cpp {__llama_cpp_tag__})"


def quantize(src: Path | str, dst: Path | str, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (what `llama-quantize SRC DST TYPE` runs): an f16/bf16/f32 GGUF in, `quant` out."""
    ffi, lib = _lib()
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = FTYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {quant} (set FALCON_QLORA_LLAMA_LOG=1 to see why)")


class Model:
    """One GGUF loaded by llama.cpp on the CPU, with a context of n_ctx tokens."""

    def __init__(self, path: Path | str, n_ctx: int = 512, threads: int | None = None):
        self.ffi, self.lib = _lib()
        lib, ffi = self.lib, self.ffi
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise UserError(f"llama.cpp could not load {path} (set FALCON_QLORA_LLAMA_LOG=1 to see why)")
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
        self.ctx = lib.llama_init_from_model(self.model, cp)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """llama.cpp's tokenizer; no BOS is added (callers add it where the model wants one)."""
        raw = text.encode()
        buf = self.ffi.new("llama_token[]", len(raw) + 8)
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(raw) + 8, False, special)
        return [buf[i] for i in range(n)]

    def piece(self, token: int) -> bytes:
        buf = self.ffi.new("char[]", 256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 256, 0, False)
        return self.ffi.buffer(buf, max(n, 0))[:]

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def _decode(self, tokens: list[int], start: int, all_logits: bool):
        lib = self.lib
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == len(tokens) - 1 else 0
            if lib.llama_decode(self.ctx, batch) != 0:
                raise UserError("llama.cpp could not evaluate the prompt (set FALCON_QLORA_LLAMA_LOG=1 to see why)")
        finally:
            lib.llama_batch_free(batch)

    def _row(self, i: int):
        import numpy as np
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.frombuffer(self.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32).copy()

    def logits(self, tokens: list[int]):
        """Logits at every position of one sequence, shape (len(tokens), n_vocab), from a fresh context."""
        import numpy as np
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._decode(tokens, 0, all_logits=True)
        return np.stack([self._row(i) for i in range(len(tokens))])

    def greedy(self, tokens: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
        """Argmax decoding from a fresh context until an end-of-generation token or the limit: (new ids, ended)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._decode(tokens, 0, all_logits=False)
        out, pos = [], len(tokens)
        for _ in range(max_new_tokens):
            nxt = int(self._row(-1).argmax())
            if self.is_eog(nxt):
                return out, True
            out.append(nxt)
            self._decode([nxt], pos, all_logits=False)
            pos += 1
        return out, False


def greedy(path: Path | str, prompts: list[str], max_new_tokens: int = 48) -> list[tuple[str, bool]]:
    """Greedy answers from llama.cpp, each prompt tokenized by llama.cpp from the GGUF's own vocabulary:
    [(answer text, stopped at an end-of-generation token)]."""
    with Model(path) as m:
        bos = m.lib.llama_vocab_bos(m.vocab) if m.lib.llama_vocab_get_add_bos(m.vocab) else None
        results = []
        for prompt in prompts:
            ids, ended = m.greedy(([bos] if bos is not None else []) + m.tokenize(prompt), max_new_tokens)
            results.append((b"".join(m.piece(t) for t in ids).decode("utf-8", "replace"), ended))
        return results
