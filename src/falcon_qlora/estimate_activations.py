"""What a training step keeps on the device besides weights and optimizer state: the activation model of `estimate`.

Per decoder layer, what autograd saves for backward (read off the code at each call site, checked against the CUDA
allocator history of the demo preset at its peak: bench/raw/h200_demo_memory_*.json), plus per-process constants.
"""
from __future__ import annotations

import os
import re

from .config import RunConfig

MiB = 2 ** 20
# torch keeps one cuBLAS workspace per (handle, stream) and one handle per thread, allocated through its caching
# allocator on the first GEMM: the training thread's (first forward) and autograd's device thread's (first backward).
CUBLAS_THREADS = 2


def cublas_workspace_bytes(capability: tuple[int, int] | None = None) -> int:
    """One cuBLAS workspace: CUBLAS_WORKSPACE_CONFIG (":SIZE_KiB:COUNT" pairs) if set, else torch's default, 32 MiB on
    Hopper and later (":4096:8", what the H200 allocates) and ":4096:2:16:8" before. capability None: assume Hopper
    (the larger one: an estimate made before the GPU is known)."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config is None:
        config = ":4096:8" if capability is None or capability[0] >= 9 else ":4096:2:16:8"
    return sum(int(kib) * 1024 * int(n) for kib, n in re.findall(r":(\d+):(\d+)", config))


def lora_weight_copies(sh: dict, cfg: RunConfig, d: int, fused_lora: bool, act_bytes: int) -> int:
    """Bytes per layer of LoRA weights cast to the compute dtype and kept by the GEMMs that use them (autocast
    caches the cast of a weight that requires grad; the GEMM saves it for the input's gradient). peft runs A and B
    under autocast; profiles' single-GEMM LoRA casts B only to its output's dtype (act_bytes), no copy when fp32."""
    if d >= 4:
        return 0
    a = sum(cfg.lora_r * i for name, i, _ in sh["linears"] if name in cfg.lora_target_modules)
    b = sum(cfg.lora_r * o for name, _, o in sh["linears"] if name in cfg.lora_target_modules)
    return (a + (b if not fused_lora or act_bytes == d else 0)) * d // sh["layers"]


def _lora_saved(cfg: RunConfig, name: str, dim: int, d: int, shared: bool, packed: bool = False) -> int:
    """Bytes per token that a LoRA branch keeps for backward: its input as A's GEMM sees it, the dropout mask (a
    byte per value; a bit with the profiles' packed masks), A's output. Under autocast (d < 4) A runs in d, so the
    d-byte cast copy is what is kept, not the fp32 input."""
    if name not in cfg.lora_target_modules:
        return 0
    mask = (dim // 8 if packed and dim % 8 == 0 else dim) if cfg.lora_dropout > 0 else 0
    if d < 4:
        return dim * d + mask + cfg.lora_r * d
    lb = 4  # fp32 run: falcon-qlora keeps LoRA weights in fp32
    if cfg.lora_dropout > 0:
        x = dim * lb          # the dropout output
    else:
        x = 0 if shared else dim * d  # the input itself; `shared`: already kept by another consumer
    return x + mask + cfg.lora_r * lb


def layer_activation_bytes(sh: dict, cfg: RunConfig, seq: int, d: int, cuda: bool, fused_attention: bool = False,
                           norm_bytes: int = 4, residual_bytes: int = 4, mask_len: int | None = None,
                           packed_masks: bool = False) -> int:
    """Bytes per token one decoder layer keeps for backward (no checkpointing). d: the compute dtype's bytes (< 4:
    autocast). norm_bytes: Falcon's LayerNorm output (fp32 under autocast; d with the profiles' norm patch), which
    sets the dtype of everything after it. fused_attention: the profiles' Falcon attention (SDPA flash per row).
    residual_bytes: Falcon's residual stream, fp32 (autocast's LayerNorm output feeds every residual add); a Llama's
    (its RMSNorm returns its input's dtype, so the MLP runs in it too). mask_len: the key length of the additive mask
    each layer's SDPA keeps a copy of (padding-free rows: the whole micro-batch's tokens; default seq). packed_masks:
    LoRA dropout masks kept as bits (fast_paths.pack_dropout_masks)."""
    h, ffn, n, hd = sh["hidden"], sh["ffn"], sh["heads"], sh["head_dim"]
    plain_x = cfg.lora_dropout == 0 and d == 4  # LoRA A keeps the very input tensor
    lo = lambda name, dim, shared=False: _lora_saved(cfg, name, dim, d, shared, packed_masks)  # noqa: E731
    kv = h if sh["expand_kv"] or sh["gated_mlp"] else sh["kv_heads"] * hd
    if fused_attention:  # q, k, v (multi-query K/V expanded as views), output, log-sum-exp; no probabilities
        attn = 2 * h * d + 2 * sh["kv_heads"] * hd * d + n * 4
    elif sh["multi_query"]:  # one K/V head: SDPA takes its math path, in fp32: q, expanded k and v, probabilities
        attn = 3 * h * 4 + n * seq * 4
    else:  # a fused kernel keeps q, k, v, output, log-sum-exp and the additive padding mask
        # Falcon-40B's block expands K/V to every head; transformers repeats Llama's K/V heads when masked
        attn = 2 * h * d + 2 * kv * d + n * 4 + (mask_len or seq) * (d if cuda else 4)
    if sh["model_type"] == "falcon":
        nb = norm_bytes
        n_ln = 2 if sh["expand_kv"] else 1
        ln = residual_bytes * h * n_ln + 8 * n_ln  # LayerNorm keeps its input
        ln_out = h * nb * n_ln if plain_x else 0
        return (ln + ln_out + lo("query_key_value", h, True) + lo("dense_h_to_4h", h, True) + attn
                + lo("dense", h) + ffn * nb + lo("dense_4h_to_h", ffn))
    # Llama family: two RMSNorms (each keeps its input in fp32: a copy, or the fp32 residual itself), SwiGLU MLP whose
    # gate and up outputs (kept by silu and the product) and silu output are in the residual stream's dtype
    norms = 2 * (h * 4 + 4)
    ab = residual_bytes
    norm_out = 2 * h * ab if plain_x else 0
    qkv = lo("q_proj", h, True) + lo("k_proj", h, True) + lo("v_proj", h, True)
    mlp = 3 * ffn * ab + lo("gate_proj", h, True) + lo("up_proj", h, True) + lo("down_proj", ffn)
    return norms + norm_out + qkv + attn + lo("o_proj", h) + mlp
