"""llama.cpp itself, through its Python binding `llama-cpp-python` (the `gguf` extra): k-quantization of an exported
GGUF, and running one (logits, greedy decoding) to check what was exported.

    from falcon_qlora import llamacpp
    llamacpp.quantize("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m")     # what llama-quantize does
    llamacpp.greedy("model-q4_k_m.gguf", ["### Human: hi ### Assistant:"])   # [(text, stopped_at_eos)]

llama-cpp-python is published on PyPI as source only: installing it compiles llama.cpp (see docs/export.md for the
time that takes). Nothing here re-implements a kernel.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

EXTRA = 'pip install "falcon-qlora[gguf]"'
PACKAGE = "llama-cpp-python"
# llama.cpp's own file types (enum llama_ftype in llama.h), as llama-quantize names them.
FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
          "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
# Bits per weight of each, as llama-quantize reports them for 7B models: for the disk estimate only.
BITS = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q2_k": 3.4, "q3_k_s": 3.5, "q3_k_m": 3.9,
        "q3_k_l": 4.3, "q4_k_s": 4.6, "q4_k_m": 4.9, "q5_k_s": 5.5, "q5_k_m": 5.7, "q6_k": 6.6}
# k-quants pack rows in blocks of 256: a matrix whose rows are not a multiple of 256 (Falcon-7B's 4544-wide inputs,
# SmolLM2's 576) falls back to a legacy type (llama.cpp: q2_k/q3_k -> iq4_nl, q4_k -> q5_0, q5_k -> q5_1,
# q6_k -> q8_0); the vocabulary matrix takes q6_k in the k-quant recipes (q8_0 when it falls back).
FALLBACK_BITS = {"q2_k": 4.5, "q3_k_s": 4.5, "q3_k_m": 4.5, "q3_k_l": 4.5, "q4_k_s": 5.5, "q4_k_m": 5.5,
                 "q5_k_s": 6.0, "q5_k_m": 6.0, "q6_k": 8.5}
VOCAB_BITS, VOCAB_FALLBACK_BITS = 6.5625, 8.5
K_BLOCK = 256


def bits_per_weight(quant: str, shape: tuple, vocab_size: int) -> float:
    """Bits per weight llama.cpp's quantizer gives one tensor of `shape` (torch order: rows last), for the disk
    estimate; vectors (norms, biases) stay f32."""
    if len(shape) < 2:
        return 32.0
    fits = shape[-1] % K_BLOCK == 0 or quant not in FALLBACK_BITS
    if shape[0] == vocab_size and quant in FALLBACK_BITS:
        return VOCAB_BITS if fits else VOCAB_FALLBACK_BITS
    return BITS[quant] if fits else FALLBACK_BITS[quant]


def binding():
    """The llama_cpp module, or a one-line error naming the extra."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"this needs llama.cpp through the package {PACKAGE}: run `{EXTRA}` (it compiles llama.cpp, "
                        "a few minutes)") from None
    except OSError as err:   # installed, but its library does not load on this machine
        raise UserError(f"{PACKAGE} is installed but its llama.cpp library does not load: "
                        f"{str(err).splitlines()[0][:160]}") from None
    return llama_cpp


def available() -> bool:
    try:
        binding()
    except UserError:
        return False
    return True


def version() -> str:
    return f"{PACKAGE} {binding().__version__}"


def quantize(src: Path | str, dst: Path | str, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (what `llama-quantize SRC DST TYPE` runs): an f16/bf16/f32 GGUF in, `quant` out."""
    import ctypes
    lib = binding()
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp could not quantize {src} to {quant}")


class Model:
    """One GGUF loaded by llama.cpp on the CPU, logits kept for every position."""

    def __init__(self, path: Path | str, n_ctx: int = 512, threads: int | None = None):
        lib = binding()
        try:
            self.llm = lib.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                                 n_threads=threads or os.cpu_count() or 1)
        except ValueError as err:
            raise UserError(f"llama.cpp could not load {path}: {err}") from None
        self.vocab = lib.llama_model_get_vocab(self.llm.model)
        self.lib = lib

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenizer on the GGUF's vocabulary, with BOS if the GGUF says the model wants one."""
        return self.llm.tokenize(text.encode(), add_bos=self.lib.llama_vocab_get_add_bos(self.vocab), special=True)

    def logits(self, tokens: list[int]):
        """Logits at every position of one sequence, shape (len(tokens), n_vocab), from a fresh context."""
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[:len(tokens)].copy()

    def greedy(self, tokens: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
        """Argmax decoding until an end-of-generation token or the limit: (new ids, stopped at end of generation)."""
        self.llm.reset()
        self.llm.eval(tokens)
        out = []
        for _ in range(max_new_tokens):
            nxt = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            if self.lib.llama_vocab_is_eog(self.vocab, nxt):
                return out, True
            out.append(nxt)
            self.llm.eval([nxt])
        return out, False

    def text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "replace")


def greedy(path: Path | str, prompts: list[str], max_new_tokens: int = 48) -> list[tuple[str, bool]]:
    """Greedy answers from llama.cpp, each prompt tokenized by llama.cpp from the GGUF's own vocabulary:
    [(answer text, stopped at an end-of-generation token)]."""
    with Model(path) as m:
        return [(m.text(ids), ended) for ids, ended in (m.greedy(m.tokenize(p), max_new_tokens) for p in prompts)]
