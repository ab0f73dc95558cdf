"""The memory model: what a run keeps on one device, from the model's shape and a RunPlan (plan.py), with nothing
downloaded and no GPU needed.

    from falcon_qlora.memory import peak; peak(cfg, make_plan(cfg, free_bytes=80 * 2**30))["peak_bytes"]

Model shapes come from built-in tables (Falcon-7B/40B, SmolLM2-135M) or from a local folder's config.json (or the hub
cache); the model is then built on torch's meta device, which allocates nothing, to count its layers exactly.
The activation model follows what autograd really keeps for these decoder blocks (4-bit frozen linears keep no
input; LoRA inputs are kept in fp32, LoRA's dtype; TRL computes the loss in vocabulary tiles without full logits;
estimate_activations.py). tests/test_estimate.py holds it to within 15% of the peaks that measure.training_peak
measures; bench/estimate_vs_measured.py to the H200's.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

from .config import RunConfig
from .errors import UserError
from .estimate_activations import (CUBLAS_THREADS, cublas_workspace_bytes, layer_activation_bytes,
                                   lora_weight_copies)
from .offload import MIN_BYTES as OFFLOAD_MIN  # smaller saved tensors stay on the GPU

GiB = 2 ** 30
# Shapes of the models a user is likely to estimate before downloading them (from their config.json files).
_FALCON_7B = dict(model_type="falcon", hidden_size=4544, num_attention_heads=71, num_hidden_layers=32,
                  multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False, alibi=False,
                  vocab_size=65024)
_FALCON_40B = dict(model_type="falcon", hidden_size=8192, num_attention_heads=128, num_kv_heads=8,
                   num_hidden_layers=60, new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False,
                   vocab_size=65024)
_SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                     tie_word_embeddings=True)
BUILTIN_CONFIGS = {"tiiuae/falcon-7b": _FALCON_7B, "tiiuae/falcon-7b-instruct": _FALCON_7B,
                   "tiiuae/falcon-40b": _FALCON_40B, "tiiuae/falcon-40b-instruct": _FALCON_40B,
                   "smollm2-135m": _SMOLLM2_135M, "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
                   "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M}
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768   # trl.kernels.chunked_logprob: the loss is computed on such tiles
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_config(name: str):
    """A transformers config for `name` without downloading anything."""
    from transformers import AutoConfig
    if name in BUILTIN_CONFIGS:
        spec = dict(BUILTIN_CONFIGS[name])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    if (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name)
    try:
        return AutoConfig.from_pretrained(name)  # the hub cache, or the hub when online
    except (OSError, ValueError):
        known = ", ".join(BUILTIN_CONFIGS)
        raise UserError(f"no config for model '{name}' here (offline, not cached): pass a local folder with a "
                        f"config.json as --model_name_or_path, or one of the built-in shapes: {known}") from None


def model_shapes(config) -> dict:
    """Count parameters and list the linear layers by building the model on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    linears = [(name.split(".")[-1], m.in_features, m.out_features)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb]
    params = {id(p): p.numel() for p in model.parameters()}
    h, heads = config.hidden_size, config.num_attention_heads
    if config.model_type == "falcon":
        kv = config.num_kv_heads if config.new_decoder_architecture else 1 if config.multi_query else heads
    else:
        kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None) or 4 * h
    return dict(model_type=config.model_type, params=sum(params.values()), linears=linears, hidden=h, heads=heads,
                kv_heads=kv, head_dim=head_dim, ffn=ffn, layers=config.num_hidden_layers, vocab=config.vocab_size,
                alibi=bool(getattr(config, "alibi", False)), gated_mlp=any(n == "gate_proj" for n, _, _ in linears),
                multi_query=config.model_type == "falcon" and not config.new_decoder_architecture
                and bool(config.multi_query),
                expand_kv=config.model_type == "falcon" and bool(config.new_decoder_architecture))


def quantized_bytes(numel: int, double_quant: bool) -> int:
    """NF4: half a byte per weight, one absmax per 64-weight block (fp32; with double quantization uint8 plus one
    fp32 per 256 blocks and the 256-entry 8-bit code table), and the 16-entry NF4 code table."""
    blocks = math.ceil(numel / 64)
    consts = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    consts += 16 * 4
    return math.ceil(numel / 2) + consts


def optimizer_bytes_per_param(optim: str) -> float:
    o = optim.lower()
    if "8bit" in o:
        return 2.0 if "adam" in o else 1.0
    if "adafactor" in o:
        return 0.1  # factored second moment only
    if "sgd" in o:
        return 0.0
    if "lion" in o:
        return 4.0
    return 8.0  # AdamW: two fp32 moments (paged or not)


def compute_bytes(cfg: RunConfig, cuda: bool) -> int:
    """Bytes per value of the compute dtype, as model.resolve_compute_dtype picks it."""
    if cfg.compute_dtype == "auto":
        return 2 if cuda else 4  # bf16 (fp16 on a T4: the same size); fp32 on a CPU
    return DTYPE_BYTES[cfg.compute_dtype]


@functools.lru_cache(maxsize=8)
def shapes(name: str) -> dict:
    """model_shapes of a model by name, built once per process."""
    return model_shapes(model_config(name))


def peak(cfg: RunConfig, plan) -> dict:
    """Peak training memory of one process running `plan` (a plan.RunPlan; not imported: plan.py costs its candidate
    splits here), in bytes, on the plan's device.

    Peak = base weights (4-bit linears + the rest in the compute dtype) + LoRA weights, gradients and optimizer
    state (fp32; paged states live in unified memory, outside torch's count) + activations of one micro-batch of
    rows at max_length (also padding-free: the worst case): every layer's kept tensors (or only each layer's input
    with gradient checkpointing, on the host when offloaded, plus one layer recomputed), and the loss head's tiles.
    device "cuda": what a GPU run needs; "cpu": how the tests measure it (fp32, no fused kernels).
    """
    p, parts = plan, set(plan.parts)
    cuda = p.device == "cuda"
    sh = shapes(cfg.model_name_or_path)
    d = compute_bytes(cfg, cuda)
    falcon = sh["model_type"] == "falcon"
    fused = "attention" in parts and falcon and not sh["alibi"]
    norms = p.norms and falcon  # norm outputs in the compute dtype (bf16/fp16 only)
    nb = d if norms else 4
    # fast_paths.norms_in_compute_dtype upcasts the embedding output to fp32 where it patched a LayerNorm (Falcon: as
    # autocast leaves its residual stream); a Llama (RMSNorm) keeps its bf16 residual stream
    hook = p.norms and falcon and "bf16_residual" not in parts
    res = (d if norms and not hook else 4) if falcon else (4 if hook else d)  # residual stream bytes
    b, s, h, L = p.micro_batch, cfg.max_length, sh["hidden"], sh["layers"]
    T, Tn = b * s, b * (s - 1)  # tokens in a micro-batch; positions that predict a next token
    sizes = [i * o for _, i, o in sh["linears"]]
    linear_params = sum(sizes)
    if cfg.load_in_4bit:
        base = sum(quantized_bytes(n, cfg.bnb_4bit_use_double_quant) for n in sizes)
    else:
        base = linear_params * d
    weights = base + (sh["params"] - linear_params) * d
    cached = cfg.load_in_4bit and "weight_cache" in parts  # fast_paths.cache_dequantized_weights
    cache = linear_params * d if cached else 0
    lora = lora_params(cfg, sh)
    paged = cuda and "paged" in p.optim  # bitsandbytes' paged states: unified memory, not torch's allocator
    lora_b, grads, optim = 4 * lora, 4 * lora, int(optimizer_bytes_per_param(p.optim) * lora)
    # Trainer sets gradients to None after each optimizer step: without accumulation they are born in backward, layer
    # by layer as the layers' activations die; none exist yet at the loss head, nearly all at layer 0's backward
    held_grads = grads if p.accumulation > 1 else 0
    static = weights + cache + lora_b + held_grads + (0 if paged else optim)

    mask_len = T if "padding_free" in parts and not falcon else None  # one mask over the rows laid end to end
    packed = "packed_masks" in parts and "compile" in parts  # fast_paths.pack_dropout_masks: compiled layers only
    layer = layer_activation_bytes(sh, cfg, s, d, cuda, fused, nb, res, mask_len, packed) * T
    layer += lora_weight_copies(sh, cfg, d, "lora" in parts, nb if falcon else res)
    dequant = max(sizes) * d if cfg.load_in_4bit and not cached else 0  # one weight at a time, forward and backward
    probs = sh["heads"] * s * 4 if sh["multi_query"] and not fused else 0
    layer_bwd = 2 * T * max(sh["ffn"] * (nb if falcon else 4), probs) + dequant
    res0 = 4 if hook else d  # layer 0's input: the embedding output (the norm patch upcasts it to fp32)
    offload = p.offload and p.checkpointing and T * h * res >= OFFLOAD_MIN  # smaller inputs stay (offload.MIN_BYTES)
    inputs_kept = T * h * (res0 + (L - 1) * res)
    rot = T * sh["head_dim"] * 4  # one of rotary cos/sin, passed to every checkpointed layer
    host = (inputs_kept + T * h * res + (2 * L * rot if rot >= OFFLOAD_MIN else 0)) if offload else 0
    kept = (0 if offload else inputs_kept) if p.checkpointing else L * layer
    inputs = T * 3 * 8 + 2 * rot  # ids, labels, mask; rotary cos/sin
    # the final norm's input (on the host when offloaded) and the flattened hidden states the loss keeps
    head_kept = (0 if offload else T * h * res) + Tn * h * d
    vocab_tile = p.head_chunk or TRL_VOCAB_TILE
    tile = min(Tn, TRL_TOKEN_TILE) * vocab_tile * d  # TRL's logits tile (full width even for small vocabs)
    cpu_tiles = 0 if cuda else 5 * min(Tn, TRL_TOKEN_TILE) * min(sh["vocab"], vocab_tile) * 4
    loss_phase = head_kept + tile + Tn * h * 4 + cpu_tiles  # + fp32 gradient of the hidden states
    back = 2 * T * h * res if offload else 0  # the layer input copied back, and the next one on its way
    layer_phase = layer + layer_bwd + back if p.checkpointing else layer_bwd
    workspaces = CUBLAS_THREADS * cublas_workspace_bytes(_capability()) if cuda else 0
    activations = inputs + workspaces + max(kept + loss_phase, max(kept, grads - held_grads) + layer_phase)
    return dict(compute_bytes=d, params=sh["params"], quantized_params=linear_params if cfg.load_in_4bit else 0,
                lora_params=lora, weights_bytes=weights, weight_cache_bytes=cache, lora_bytes=lora_b, grad_bytes=grads, optimizer_bytes=optim,
                optimizer_paged=paged, activation_bytes=activations, peak_bytes=static + activations,
                host_bytes=host, tokens_per_micro_batch=T, layer_activation_bytes=layer)


def lora_params(cfg: RunConfig, sh: dict) -> int:
    """Trainable LoRA parameters: r x (in + out) of every targeted linear."""
    n = sum(cfg.lora_r * (i + o) for name, i, o in sh["linears"] if name in cfg.lora_target_modules)
    if n == 0:
        raise UserError(f"lora_target_modules {cfg.lora_target_modules} match no linear layer of "
                        f"{cfg.model_name_or_path} (its layers: {sorted({n for n, _, _ in sh['linears']})})")
    return n


def _capability():
    """This GPU's compute capability, None without one (cublas_workspace_bytes then assumes Hopper's)."""
    import torch
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None



def disk_estimate(cfg: RunConfig, n_lora: int) -> dict:
    """Each checkpoint holds the fp32 adapter, the optimizer state and the tokenizer; save_total_limit bounds how
    many stay on disk (one more exists for a moment while the trainer rotates them)."""
    tok = _tokenizer_bytes(cfg.model_name_or_path)
    ckpt = n_lora * (4 + optimizer_bytes_per_param(cfg.optim)) + tok + 64 * 1024
    written = cfg.max_steps // cfg.save_steps
    limit = cfg.save_total_limit
    kept = written if limit is None else min(written, limit)
    final = n_lora * 4 + tok
    return dict(checkpoint_bytes=int(ckpt), checkpoints_written=written, checkpoints_kept=kept,
                disk_bytes=int(kept * ckpt + final), disk_peak_bytes=int(min(written, kept + 1) * ckpt + final))


def _tokenizer_bytes(name: str) -> int:
    folder = Path(name)
    files = [p for p in folder.glob("*") if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
    return sum(p.stat().st_size for p in files) if files else 3 * 2 ** 20  # Falcon's tokenizer.json is ~2.7 MB
