"""The profiles' faster code paths for Falcon, each a per-instance patch that profiles.remove_profile undoes.

    norms_in_compute_dtype(model)   # layer-norm outputs in bf16/fp16 (computed in fp32), residual stream kept fp32
    patch_falcon_attention(model)   # padding-free rows through SDPA's fused kernels, one causal block per row
    patch_lora_forward(model)       # each LoRA layer as one GEMM: addmm(result, A(dropout(x)), B^T, alpha=scale)
    cache_dequantized_weights(model)  # the frozen 4-bit weights dequantized once, not twice per step (GPU memory)
    pack_dropout_masks(model)       # LoRA dropout masks kept for backward as bits, not bytes
    compile_layers(model)           # torch.compile of each decoder layer: the element-wise glue fused

Each computes what the stock code computes (tests/test_profiles.py checks the gradients); generation, padded eval
batches and non-Falcon models fall through to the stock forwards.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass


def unwrap(model):
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model

# ------------------------------------------------------------------------------- layer norms in compute dtype
def norms_in_compute_dtype(model, residual_fp32: bool = True) -> int:
    """Cast the decoder layers' layer-norm outputs to the 4-bit layers' compute dtype (what every consumer casts
    them to anyway). residual_fp32: keep the residual stream in fp32, as autocast leaves it in the reference, by
    upcasting the embedding output. Returns the number of norms hooked."""
    import torch
    base = unwrap(model)
    dtype = _compute_dtype(base)
    if dtype is None or dtype == torch.float32:
        return 0
    n = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.LayerNorm) and "forward" not in module.__dict__:
            # the final norm feeds the LM head, which autocast runs from fp32 in the reference: keep it so
            module._fq_dtype = dtype if ".h." in f".{name}" else torch.float32
            module.forward = types.MethodType(_norm_forward, module)
            n += 1
    emb = base.get_input_embeddings()
    # only where a LayerNorm was patched: a model without one (Llama's RMSNorm) keeps its stock residual dtype
    if residual_fp32 and n and not hasattr(emb, "_fq_hook"):
        emb._fq_hook = emb.register_forward_hook(lambda m, i, out: out.float())
    return n


def _norm_forward(self, x):
    """Layer norm computed in fp32 (as autocast does on a GPU), output in the compute dtype."""
    import torch
    import torch.nn.functional as F
    w = None if self.weight is None else self.weight.float()
    b = None if self.bias is None else self.bias.float()
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(self._fq_dtype)


_norm_forward._fq_patched = True


def _compute_dtype(base):
    for m in base.modules():
        if hasattr(m, "compute_dtype") and m.compute_dtype is not None:
            return m.compute_dtype
    return next((p.dtype for p in base.parameters() if p.is_floating_point()), None)


# ------------------------------------------------------------------------------------------- Falcon attention
def patch_falcon_attention(model) -> int:
    """Route Falcon's training attention through segment_attention. Generation (a cache), alibi models and
    output_attentions keep the stock code. Returns the number of attention modules patched."""
    try:
        from transformers.models.falcon.modeling_falcon import FalconAttention
    except ImportError:
        return 0
    n = 0
    for m in unwrap(model).modules():
        if isinstance(m, FalconAttention) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_falcon_attention_forward, m)
            n += 1
    stack = decoder_stack(model)
    if n and not hasattr(stack, "_fq_hook"):
        stack._fq_hook = stack.register_forward_pre_hook(_segments_from_collator, with_kwargs=True)
    return n


SEGMENTS_FROM_COLLATOR = True  # rows from the collator's cu_seq_lens (False: from position_ids; for the bench)


def _segments_from_collator(module, args, kwargs):
    """TRL's padding-free collator sends the row boundaries it computed on the CPU (cu_seq_lens_q, max_length_q):
    the Segments of this forward's position_ids come from them, without reading anything back from the GPU. Read
    back, they would make the host wait at the start of every forward until the GPU has finished the previous
    step, and the GPU then wait for the host to queue the next one."""
    import torch
    pos, cu, longest = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if not (SEGMENTS_FROM_COLLATOR and isinstance(pos, torch.Tensor) and isinstance(cu, torch.Tensor)
            and isinstance(longest, int) and pos.dim() == 2 and pos.shape[0] == 1 and cu.dim() == 1
            and cu.numel() >= 2 and longest >= 1):
        return None
    _SEG_CACHE[0], _SEG_CACHE[1] = pos, segments_from_lengths(cu.to(pos.device), longest, pos.shape[1])
    return None


def segments_from_lengths(cu, max_len: int, total: int):
    """Segments of rows laid end to end, from their cumulative lengths cu (n + 1,) and the longest length: only
    shapes the host already knows, so the GPU computes the rest without a sync."""
    import torch
    n, dev = cu.numel() - 1, cu.device
    cu = cu.long()
    ar = torch.arange(max_len, device=dev)
    index = (cu[:-1, None] + ar[None, :]).clamp(max=total - 1)
    t = torch.arange(total, device=dev)
    row = torch.searchsorted(cu[1:], t, right=True).clamp(max=n - 1)  # the row of each token
    flat = row * max_len + (t - cu[row])
    return Segments(n, max_len, total, index, flat, equal=max_len * n == total)


def _falcon_attention_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None,
                              use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb
    stock = type(self).forward
    if (alibi is not None or layer_past is not None or output_attentions or position_ids is None
            or hidden_states.shape[0] != 1 or hidden_states.shape[1] < 2 or position_embeddings is None):
        return stock(self, hidden_states, alibi, attention_mask, position_ids=position_ids, layer_past=layer_past,
                     use_cache=use_cache, output_attentions=output_attentions,
                     position_embeddings=position_embeddings, **kwargs)
    seg = segments(position_ids)
    if seg is None:
        return stock(self, hidden_states, alibi, attention_mask, position_ids=position_ids, layer_past=layer_past,
                     use_cache=use_cache, output_attentions=output_attentions,
                     position_embeddings=position_embeddings, **kwargs)
    q, k, v = self._split_heads(self.query_key_value(hidden_states))  # (1, T, heads, d) each
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (1, heads, T, d)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out = segment_attention(q, k, v, seg)  # (1, T, heads * d)
    return self.dense(out), None


_falcon_attention_forward._fq_patched = True


@dataclass
class Segments:
    """Rows laid end to end: row i is tokens [starts[i], starts[i] + lengths[i]). index (rows, L) gathers them into
    a padded (rows, L) block; flat picks each token back out of the flattened block."""
    n: int
    max_len: int
    total: int
    index: object
    flat: object
    equal: bool = False  # all rows the same length: a reshape, no gather


_SEG_CACHE: list = [None, None]  # (position_ids tensor, Segments): computed once per forward, not per layer


def _eager(fn):
    """Run fn outside torch.compile's graphs (compiled layers break once around it, not inside it)."""
    import torch
    return torch.compiler.disable(fn)


@_eager
def segments(position_ids):
    """position_ids (1, T) restarting at 0 for each row -> Segments, or None if it is not such a layout."""
    if _SEG_CACHE[0] is not position_ids:
        _SEG_CACHE[0], _SEG_CACHE[1] = position_ids, _segments_from_positions(position_ids)
    return _SEG_CACHE[1]


def _segments_from_positions(position_ids):
    """Segments read from the positions themselves: rows start where they restart at 0 (host syncs)."""
    import torch
    pos = position_ids[0]
    total = pos.numel()
    starts = (pos == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        seg = None
    else:
        ends = torch.cat([starts[1:], starts.new_tensor([total])])
        lengths = ends - starts
        max_len = int(lengths.max())
        ar = torch.arange(max_len, device=pos.device)
        index = (starts[:, None] + ar[None, :]).clamp(max=total - 1)
        valid = ar[None, :] < lengths[:, None]
        flat = (torch.arange(starts.numel(), device=pos.device)[:, None] * max_len + ar[None, :])[valid]
        seg = Segments(starts.numel(), max_len, total, index, flat, equal=max_len * starts.numel() == total)
    return seg


def segment_attention(q, k, v, seg: Segments):
    """Causal attention within each row only. q (1, H, T, d); k, v (1, Hkv, T, d) with H % Hkv == 0.
    One row: SDPA directly. Several: gather the rows into a padded block, SDPA with is_causal (each row's padding
    sits after its real tokens, so real queries never see it), and pick the real tokens back out."""
    import torch
    import torch.nn.functional as F
    h, d = q.shape[1], q.shape[-1]
    if torch.is_autocast_enabled(q.device.type):  # cast K/V before expanding them to all heads, not after
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if seg.n == 1:
        o = F.scaled_dot_product_attention(q, *_heads(k, v, h), is_causal=True)  # (1, H, T, d)
        return o.transpose(1, 2).reshape(1, seg.total, h * d)
    if seg.equal:  # (1, heads, T, d) -> (rows, heads, L, d) without copying the real tokens around
        qb, kb, vb = (x.transpose(1, 2).reshape(seg.n, seg.max_len, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
    else:
        qb, kb, vb = (x[0][:, seg.index].transpose(0, 1) for x in (q, k, v))  # (rows, heads, L, d)
    o = F.scaled_dot_product_attention(qb, *_heads(kb, vb, h), is_causal=True)
    o = o.transpose(1, 2).reshape(seg.n * seg.max_len, h * d)
    return (o if seg.equal else o[seg.flat]).unsqueeze(0)


KV_EXPAND = True  # multi-query K/V: expand views to all heads (False: materialise them)


def _heads(k, v, h):
    if k.shape[1] == h:
        return k, v
    if KV_EXPAND:
        return k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
    return k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)


# ----------------------------------------------------------------------------------------------- LoRA forward
def patch_lora_forward(model) -> int:
    """peft computes a LoRA layer as result.clone() + (B(A(dropout(x))) * scale): three full-width passes over
    the output. Fold them into one GEMM: addmm(result, A(dropout(x)), B^T, alpha=scale), same math."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return 0
    register_ops()
    n = 0
    for m in model.modules():
        if isinstance(m, LoraLayer) and hasattr(m, "lora_A") and "forward" not in m.__dict__:
            m.forward = types.MethodType(_lora_forward, m)
            n += 1
    return n


def _lora_forward(self, x, *args, **kwargs):
    import torch
    names = self.active_adapters
    a = names[0] if len(names) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or a not in self.lora_A
            or a in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(a, False)
            or self.lora_B[a].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[a], self.lora_B[a]
    autocast = torch.is_autocast_enabled(x.device.type)
    h = lora_a(_dropout(self.lora_dropout[a], x if autocast else x.to(lora_a.weight.dtype)))
    w = _cached_weight(self.base_layer, x) if LINEAR_LORA else None
    if w is not None:  # the dequantized copy: both GEMMs into one output, in one op
        with torch.autocast(x.device.type, enabled=False):
            out = torch.ops.falcon_qlora.linear_lora(x.reshape(-1, x.shape[-1]), w, h.reshape(-1, h.shape[-1]).to(
                w.dtype), lora_b.weight.to(w.dtype), self.scaling[a])
        return out.view(*x.shape[:-1], w.shape[0])
    result = self.base_layer(x)
    with torch.autocast(x.device.type, enabled=False):
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                          lora_b.weight.to(result.dtype).t(), alpha=self.scaling[a])
    return out.view(result.shape)


_lora_forward._fq_patched = True


def _cached_weight(base, x):
    """The base layer's dequantized weight where the fused op computes exactly what its forward would: the cache
    in place, x already in its dtype, no bias, no hooks."""
    w = getattr(base, "_fq_weight", None)
    if (w is None or x.dtype != w.dtype or getattr(base, "bias", None) is not None or base._forward_hooks
            or base._forward_pre_hooks or base.forward.__func__ is not _cached_4bit_forward):
        return None
    return w


LINEAR_LORA = True  # with the weight cache, base and B GEMMs as one op (False: base forward, then addmm; for the bench)
LORA_FIRST = True  # in that op, the B GEMM first and the base GEMM accumulating onto it (False: the other order)


def register_ops() -> None:
    """Register the custom ops once per process, before any forward uses them. Forwards call them as
    torch.ops.falcon_qlora.*: torch.compile would trace into a functools.cache wrapper, find the registration
    and break the layer's graph there, at every LoRA layer."""
    _linear_lora()
    _aten_dropout("dropout", packed=False)
    _aten_dropout("dropout_packed", packed=True)


@functools.cache
def _linear_lora():
    """falcon_qlora::linear_lora(x, w, h, b, scale) = x @ w.T + scale * h @ b.T. LoRA's small B GEMM first, then
    the frozen base GEMM accumulates onto it (beta=scale): the base GEMM is compute-bound, so reading that addend in
    its epilogue is almost free, where adding the B GEMM afterwards reads and writes the whole output once more.
    As one op inductor cannot split it: its own lowering of an addmm copies the addend first (a device-to-device
    copy per LoRA layer, bench/NOTES.md). w is frozen (no gradient)."""
    import torch

    @torch.library.custom_op("falcon_qlora::linear_lora", mutates_args=(),
                             schema="(Tensor x, Tensor w, Tensor h, Tensor b, float scale) -> Tensor")
    def linear_lora(x, w, h, b, scale):
        if LORA_FIRST:
            return torch.mm(h, b.t()).addmm_(x, w.t(), beta=scale)
        return torch.mm(x, w.t()).addmm_(h, b.t(), alpha=scale)

    @linear_lora.register_fake
    def _(x, w, h, b, scale):
        return x.new_empty(x.shape[0], w.shape[0])

    def setup_context(ctx, inputs, output):
        x, w, h, b, scale = inputs
        ctx.scale = scale
        ctx.save_for_backward(w, h, b)

    def backward(ctx, grad):
        w, h, b = ctx.saved_tensors
        gx = grad.mm(w) if ctx.needs_input_grad[0] else None
        gh = grad.mm(b) * ctx.scale if ctx.needs_input_grad[2] else None
        gb = grad.t().mm(h) * ctx.scale if ctx.needs_input_grad[3] else None
        return gx, None, gh, gb, None

    linear_lora.register_autograd(backward, setup_context=setup_context)
    return linear_lora


ATEN_DROPOUT = True  # in compiled layers, LoRA dropout through aten's kernel (False: inductor's own, for the bench)


def _dropout(module, x):
    """LoRA's dropout. Inside torch.compile it runs as aten's dropout, an op the graph keeps whole: inductor's own
    lowering draws every random number with a Philox call of its own, which on an H200 costs more than the rest of
    the fused element-wise work (bench/NOTES.md), and its masks differ from eager ones. aten's kernel draws the same
    masks compiled or not, from the same seed, and checkpointing's recompute replays them. Where pack_dropout_masks
    marked the module, compiled layers keep the mask for backward packed to bits (same mask, same gradients)."""
    import torch
    if not (torch.compiler.is_compiling() and type(module) is torch.nn.Dropout and module.training
            and 0 < module.p < 1):
        return module(x)
    if getattr(module, "_fq_pack", False) and torch.is_grad_enabled() and x.shape[-1] % 8 == 0:
        return torch.ops.falcon_qlora.dropout_packed(x, module.p)[0]
    if ATEN_DROPOUT:
        return torch.ops.falcon_qlora.dropout(x, module.p)[0]
    return module(x)


def pack_dropout_masks(model) -> int:
    """Keep each LoRA dropout mask for backward as bits instead of bytes, in compiled layers: 1/8 of the mask memory
    (at 8 rows of 512 tokens, 130 MB -> 16 MB per Falcon-7B layer). The memory profile uses it, where a recomputed
    layer's masks are a fifth of what it holds. Inductor fuses the packing into the kernels around it; eager layers
    keep byte masks, as unfused packing would hold more in temporaries than it saves. Returns the number of dropout
    modules marked."""
    import torch
    register_ops()
    n = 0
    for m in model.modules():
        for d in (getattr(m, "lora_dropout", None) or {}).values():
            if type(d) is torch.nn.Dropout:
                d._fq_pack = True
                n += 1
    return n


def unpack_dropout_masks(model) -> None:
    for m in model.modules():
        m.__dict__.pop("_fq_pack", None)


def _pack_bits(mask):
    """bool (..., n) with n % 8 == 0 -> uint8 (..., n // 8), element 8i + j in bit j of byte i."""
    import torch
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (mask.unflatten(-1, (-1, 8)).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed):
    import torch
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()


@functools.cache
def _aten_dropout(name: str, packed: bool):
    """falcon_qlora::<name>(x, p) -> (x * mask / (1 - p), mask): torch.ops.aten.native_dropout as a custom op
    (opaque to inductor), with its backward (grad * mask / (1 - p)) for autograd; `packed`: the mask is kept for
    backward as bits. Registered once per process."""
    import torch

    @torch.library.custom_op(f"falcon_qlora::{name}", mutates_args=(), schema="(Tensor x, float p) -> (Tensor, Tensor)")
    def dropout(x, p):
        return torch.ops.aten.native_dropout(x, p, True)

    @dropout.register_fake
    def _(x, p):
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    def setup_context(ctx, inputs, output):
        ctx.scale = 1.0 / (1.0 - inputs[1])
        ctx.save_for_backward(_pack_bits(output[1]) if packed else output[1])

    def backward(ctx, grad, _grad_mask):
        (mask,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, _unpack_bits(mask) if packed else mask, ctx.scale), None

    dropout.register_autograd(backward, setup_context=setup_context)
    return dropout


# ----------------------------------------------------------------------------------------- dequantized weights
def cache_dequantized_weights(model) -> int:
    """Dequantize every frozen 4-bit weight once, to the compute dtype, and compute its layer with that copy.
    bitsandbytes dequantizes each weight in forward and again in backward, every step: the same values (its matmul
    is dequantize, then a GEMM in the compute dtype), so the results are the same, for 2 bytes per weight of GPU
    memory (13 GiB for Falcon-7B; plan.py keeps it only where the run still fits). Returns the layers cached."""
    import torch
    try:
        import bitsandbytes as bnb
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for m in unwrap(model).modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if (isinstance(m, Linear4bit) and "forward" not in m.__dict__ and qs is not None
                and tuple(qs.shape) == (m.out_features, m.in_features)):
            with torch.no_grad():
                m._fq_weight = bnb.functional.dequantize_4bit(m.weight.data, qs).to(m.compute_dtype or torch.float32)
            m.forward = types.MethodType(_cached_4bit_forward, m)
            n += 1
    return n


def _cached_4bit_forward(self, x):
    """Linear4bit.forward with the dequantized copy: input cast to the compute dtype, output back to the input's."""
    import torch.nn.functional as F
    w = self._fq_weight
    bias = None if self.bias is None else self.bias.to(w.dtype)
    return F.linear(x.to(w.dtype), w, bias).to(x.dtype)


_cached_4bit_forward._fq_patched = True


def drop_weight_cache(model) -> None:
    for m in unwrap(model).modules():
        m.__dict__.pop("_fq_weight", None)


# ------------------------------------------------------------------------------------------- compiled layers
def decoder_stack(model):
    """The decoder stack (FalconModel, LlamaModel, ...) under a PeftModel / *ForCausalLM."""
    base = unwrap(model)
    return getattr(base, "base_model", base)


def decoder_layers(model) -> list:
    """The decoder layers (FalconDecoderLayer, LlamaDecoderLayer, ...): the blocks repeated layers times."""
    import torch
    stack = decoder_stack(model)
    for name in ("h", "layers"):
        layers = getattr(stack, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


RECOMPILE_LIMIT = 64


def compile_layers(model, checkpointing: bool = False) -> int:
    """torch.compile each decoder layer (one compiled code for all of them: the layers share their code), so the
    element-wise work between the GEMMs (norms, dropout, GELU, residual adds, rotary, LoRA's scaling) runs as a
    few fused kernels, forward and backward. The row segmentation stays outside the graphs (segments). With
    gradient checkpointing the layer's forward is the checkpoint's wrapper, which compiles to nothing: its
    attention and MLP blocks are compiled instead. Returns the number of modules compiled."""
    import torch
    # the shared code compiles a few variants (layer 0's input needs no gradient, checkpointing's forward runs
    # without grad, eval, new row layouts); past dynamo's limit (8) it would fall back to eager without a word
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.suppress_errors = True  # a layer that fails to compile runs eagerly, with a warning
    register_ops()
    n = 0
    for layer in decoder_layers(model):
        blocks = [c for c in layer.children() if not isinstance(c, torch.nn.LayerNorm)] if checkpointing else [layer]
        for block in blocks:
            block.compile()
            block._fq_compiled = True
            n += 1
    return n


def uncompile_layers(model) -> None:
    for layer in decoder_layers(model):
        for block in layer.modules():
            if block.__dict__.pop("_fq_compiled", False):
                block.__dict__.pop("_compiled_call_impl", None)
