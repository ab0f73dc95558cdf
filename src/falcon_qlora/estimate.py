"""Memory and disk a run will need, from the config alone: nothing is downloaded and no GPU is needed.

    falcon-qlora estimate                                   # the reference recipe (Falcon-7B, built-in shapes)
    falcon-qlora estimate --config demo
    falcon-qlora estimate --per_device_train_batch_size 16 --gradient_checkpointing false
    from falcon_qlora.estimate import estimate; estimate(load_config("reference"))   # -> dict of bytes

Model shapes come from built-in tables (Falcon-7B/40B, SmolLM2-135M) or from a local folder's config.json (or the hub
cache); the model is then built on torch's meta device, which allocates nothing, to count its layers exactly.
The activation model follows what autograd really keeps for these decoder blocks (4-bit frozen linears keep no
input; LoRA inputs are kept in fp32, LoRA's dtype; TRL computes the loss in vocabulary tiles without full logits).
tests/test_estimate.py holds it to within 15% of the peaks that measure.training_peak measures.
"""
from __future__ import annotations

import functools
import json
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
    if cfg.compute_dtype == "auto":
        return 2 if cuda else 4  # bf16 (fp16 on a T4: the same size); fp32 on a CPU
    return DTYPE_BYTES[cfg.compute_dtype]


def resolve(cfg: RunConfig, device: str = "cuda", profile: str | None = None, free_bytes: int | None = None):
    """(profile, why): the profile a run of cfg would take, as `train` resolves it."""
    import torch
    from .profiles import resolve_profile
    profile = profile or cfg.profile
    if profile != "auto":
        return profile, "as configured"
    gpu = device == "cuda" and torch.cuda.is_available()
    if device != "cuda" or (free_bytes is None and not gpu):
        return "reference", f"auto on {'a CPU' if device != 'cuda' else 'no known GPU'} (--gpu_memory to assume one)"
    choice = resolve_profile(RunConfig(**{**cfg.__dict__, "profile": "auto"}), free_bytes)
    return choice, ("auto, this GPU" if free_bytes is None else f"auto, {free_bytes / GiB:.0f} GiB free assumed")


@functools.lru_cache(maxsize=8)
def _shapes(name: str) -> dict:
    return model_shapes(model_config(name))


def estimate(cfg: RunConfig, device: str = "cuda", profile: str | None = None, free_bytes: int | None = None, *,
             parts=None, split: tuple | None = None) -> dict:
    """Peak training memory on one device (bytes) and the disk the run's checkpoints take, from the config alone.

    Peak = base weights (4-bit linears + the rest in the compute dtype) + LoRA weights, gradients and optimizer
    state (fp32; paged states live in unified memory, outside torch's count) + activations of one micro-batch of
    rows at max_length (also padding-free: the worst case): every layer's kept tensors (or only each layer's input
    with gradient checkpointing, on the host when offloaded, plus one layer recomputed), and the loss head's tiles.
    profile: None -> cfg.profile; auto resolves as training does (free_bytes: the GPU's free memory to assume).
    device: "cuda" (what a GPU run needs) or "cpu" (how the tests measure it: fp32, no fused kernels).
    parts, split (the benchmark's variants): the profile's changes (profiles.PROFILE_PARTS) and an exact
    (micro_batch, accumulation, checkpointing, offload) instead of profiles.plan's.
    """
    from .profiles import HEAD_CHUNK, PROFILE_PARTS, Plan, plan
    cuda = device == "cuda"
    profile, why = resolve(cfg, device, profile, free_bytes)
    parts = set(PROFILE_PARTS.get(profile, ()) if parts is None else parts)
    p = Plan(profile, *split) if split else plan(cfg, profile, free_bytes)
    offload = bool(getattr(p, "offload", False)) and p.checkpointing and (split is not None or "offload" in parts)
    plan_offload = offload
    sh = _shapes(cfg.model_name_or_path)
    d = compute_bytes(cfg, cuda)
    falcon = sh["model_type"] == "falcon"
    fused = "attention" in parts and falcon and not sh["alibi"]
    norms = "norms" in parts and falcon and d < 4  # norm outputs in the compute dtype (bf16/fp16 only)
    nb = d if norms else 4
    # fast_paths.norms_in_compute_dtype upcasts the embedding output to fp32 where it patched a LayerNorm (Falcon: as
    # autocast leaves its residual stream); a Llama (RMSNorm) keeps its bf16 residual stream
    hook = "norms" in parts and falcon and d < 4 and "bf16_residual" not in parts
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
    lora = sum(cfg.lora_r * (i + o) for name, i, o in sh["linears"] if name in cfg.lora_target_modules)
    if lora == 0:
        raise UserError(f"lora_target_modules {cfg.lora_target_modules} match no linear layer of "
                        f"{cfg.model_name_or_path} (its layers: {sorted({n for n, _, _ in sh['linears']})})")
    optim_name = "adamw_torch_fused" if "optim" in parts and cuda and cfg.optim == "paged_adamw_32bit" else cfg.optim
    paged = cuda and "paged" in optim_name  # bitsandbytes' paged states: unified memory, not torch's allocator
    lora_b, grads, optim = 4 * lora, 4 * lora, int(optimizer_bytes_per_param(optim_name) * lora)
    # Trainer sets gradients to None after each optimizer step: without accumulation they are born in backward, layer
    # by layer as the layers' activations die; none exist yet at the loss head, nearly all at layer 0's backward
    held_grads = grads if p.accumulation > 1 else 0
    static = weights + lora_b + held_grads + (0 if paged else optim)

    mask_len = T if "padding_free" in parts and not falcon else None  # one mask over the rows laid end to end
    layer = layer_activation_bytes(sh, cfg, s, d, cuda, fused, nb, res, mask_len) * T
    layer += lora_weight_copies(sh, cfg, d, "lora" in parts, nb if falcon else res)
    dequant = max(sizes) * d if cfg.load_in_4bit else 0  # one weight dequantized at a time, forward and backward
    probs = sh["heads"] * s * 4 if sh["multi_query"] and not fused else 0
    layer_bwd = 2 * T * max(sh["ffn"] * (nb if falcon else 4), probs) + dequant
    res0 = 4 if hook else d  # layer 0's input: the embedding output (the norm patch upcasts it to fp32)
    offload = offload and T * h * res >= OFFLOAD_MIN  # smaller layer inputs stay on the GPU (offload.MIN_BYTES)
    inputs_kept = T * h * (res0 + (L - 1) * res)
    rot = T * sh["head_dim"] * 4  # one of rotary cos/sin, passed to every checkpointed layer
    host = (inputs_kept + T * h * res + (2 * L * rot if rot >= OFFLOAD_MIN else 0)) if offload else 0
    kept = (0 if offload else inputs_kept) if p.checkpointing else L * layer
    inputs = T * 3 * 8 + 2 * rot  # ids, labels, mask; rotary cos/sin
    # the final norm's input (on the host when offloaded) and the flattened hidden states the loss keeps
    head_kept = (0 if offload else T * h * res) + Tn * h * d
    vocab_tile = HEAD_CHUNK if "head_chunks" in parts else TRL_VOCAB_TILE
    tile = min(Tn, TRL_TOKEN_TILE) * vocab_tile * d  # TRL's logits tile (full width even for small vocabs)
    cpu_tiles = 0 if cuda else 5 * min(Tn, TRL_TOKEN_TILE) * min(sh["vocab"], vocab_tile) * 4
    loss_phase = head_kept + tile + Tn * h * 4 + cpu_tiles  # + fp32 gradient of the hidden states
    back = 2 * T * h * res if offload else 0  # the layer input copied back, and the next one on its way
    layer_phase = layer + layer_bwd + back if p.checkpointing else layer_bwd
    workspaces = CUBLAS_THREADS * cublas_workspace_bytes(_capability()) if cuda else 0
    activations = inputs + workspaces + max(kept + loss_phase, max(kept, grads - held_grads) + layer_phase)
    out = dict(model=cfg.model_name_or_path, device=device, profile=profile, profile_reason=why,
               micro_batch=p.micro_batch, accumulation=p.accumulation, checkpointing=p.checkpointing,
               offload=plan_offload, optim=optim_name, compute_bytes=d, params=sh["params"],
               quantized_params=linear_params if cfg.load_in_4bit else 0, lora_params=lora,
               weights_bytes=weights, lora_bytes=lora_b, grad_bytes=grads, optimizer_bytes=optim,
               optimizer_paged=paged, activation_bytes=activations, peak_bytes=static + activations,
               host_bytes=host, tokens_per_micro_batch=T, layer_activation_bytes=layer)
    out.update(disk_estimate(cfg, lora))
    return out


def _capability():
    """This GPU's compute capability, None without one (cublas_workspace_bytes then assumes Hopper's)."""
    import torch
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


PROFILE_ORDER = ("reference", "memory", "speed")


def profile_table(cfg: RunConfig, free_bytes: list[int]) -> list[dict]:
    """One row per profile (speed once per assumed free GPU memory): split, checkpointing, peak GPU and host."""
    rows, picks = [], {f: resolve(cfg, "cuda", "auto", f)[0] for f in free_bytes}
    for name in PROFILE_ORDER:
        for free in (free_bytes if name == "speed" else free_bytes[:1]):
            e = estimate(cfg, "cuda", name, free)
            auto = [f for f in (free_bytes if name != "speed" else [free]) if picks[f] == name]
            rows.append(dict(profile=name, free_bytes=free if name == "speed" else None, auto_at=auto,
                             **{k: e[k] for k in ("micro_batch", "accumulation", "checkpointing", "offload",
                                                  "peak_bytes", "host_bytes")}))
    return rows


def disk_estimate(cfg: RunConfig, lora_params: int) -> dict:
    """Each checkpoint holds the fp32 adapter, the optimizer state and the tokenizer; save_total_limit bounds how
    many stay on disk (one more exists for a moment while the trainer rotates them)."""
    tok = _tokenizer_bytes(cfg.model_name_or_path)
    ckpt = lora_params * (4 + optimizer_bytes_per_param(cfg.optim)) + tok + 64 * 1024
    written = cfg.max_steps // cfg.save_steps
    limit = cfg.save_total_limit
    kept = written if limit is None else min(written, limit)
    final = lora_params * 4 + tok
    return dict(checkpoint_bytes=int(ckpt), checkpoints_written=written, checkpoints_kept=kept,
                disk_bytes=int(kept * ckpt + final), disk_peak_bytes=int(min(written, kept + 1) * ckpt + final))


def _tokenizer_bytes(name: str) -> int:
    folder = Path(name)
    files = [p for p in folder.glob("*") if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
    return sum(p.stat().st_size for p in files) if files else 3 * 2 ** 20  # Falcon's tokenizer.json is ~2.7 MB


def render(est: dict, cfg: RunConfig, table: list[dict] | None = None) -> str:
    g = lambda x: f"{x / GiB:8.2f} GiB"  # noqa: E731
    ckpt = "on" if est["checkpointing"] else "off"
    paged = "  (paged: unified memory, not counted below)" if est["optimizer_paged"] else ""
    lines = [
        f"{est['model']}: {est['params'] / 1e9:.2f} B parameters, {est['quantized_params'] / 1e9:.2f} B of them in "
        f"{'4-bit' if cfg.load_in_4bit else 'full precision'}; LoRA r={cfg.lora_r}: {est['lora_params']:,} trainable",
        f"profile {est['profile']} ({est['profile_reason']}): micro-batch {est['micro_batch']} x "
        f"{est['accumulation']} accumulation, checkpointing {ckpt}"
        + (", offloading layer inputs to host memory" if est["offload"] else ""),
        f"  base weights                {g(est['weights_bytes'])}",
        f"  LoRA weights (fp32)         {g(est['lora_bytes'])}",
        f"  gradients (fp32)            {g(est['grad_bytes'])}",
        f"  optimizer state ({est['optim']}) {g(est['optimizer_bytes'])}{paged}",
        f"  activations                 {g(est['activation_bytes'])}   (batch {est['micro_batch']} x "
        f"{cfg.max_length} tokens, checkpointing {ckpt})",
        f"  peak {est['device']} memory           {g(est['peak_bytes'])}",
    ]
    if est["host_bytes"]:
        lines.append(f"  pinned host memory          {g(est['host_bytes'])}   (offloaded layer inputs)")
    elif est["offload"]:
        lines.append("  (layer inputs under 1 MiB stay on the GPU: offloading moves nothing here)")
    lines.append("  (rows at max_length, the worst case from the config alone: the padding-free rows of speed and "
                 "memory need less when they are shorter)")
    lines.append(
        f"disk: {est['checkpoints_written']} checkpoints of {est['checkpoint_bytes'] / GiB:.2f} GiB written "
        f"(every {cfg.save_steps} of {cfg.max_steps} steps), {est['checkpoints_kept']} kept "
        f"(save_total_limit={cfg.save_total_limit}): {est['disk_bytes'] / GiB:.2f} GiB with the final adapter, "
        f"{est['disk_peak_bytes'] / GiB:.2f} GiB at the peak")
    if table:
        lines += ["", "profile    GPU free   micro-batch x accum  checkpointing   peak GPU   pinned host"]
        for r in table:
            free = f"{r['free_bytes'] / GiB:5.0f} GiB" if r["free_bytes"] is not None else "    any  "
            ck = ("on, offload" if r["offload"] else "on") if r["checkpointing"] else "off"
            lines.append(f"{r['profile']:<10} {free}  {r['micro_batch']:>6} x {r['accumulation']:<6}      "
                         f"{ck:<14}{r['peak_bytes'] / GiB:7.2f} GiB {r['host_bytes'] / GiB:8.2f} GiB"
                         + ("   <- auto" + (f" at {', '.join(f'{f / GiB:.0f}' for f in r['auto_at'])} GiB free"
                                             if r["profile"] != "speed" else "") if r["auto_at"] else ""))
    return "\n".join(lines)


def _take(argv: list[str], flag: str) -> str | None:
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1] if i + 1 < len(argv) else ""
    del argv[i:i + 2]
    return value


def cli(argv: list[str]) -> int:
    """`falcon-qlora estimate [--config PRESET_OR_YAML] [--key value ...] [--profile auto|reference|speed|memory]
    [--gpu_memory GIB] [--device cuda|cpu] [--json]`"""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(cli.__doc__.strip("`") + "\n\nEstimates GPU memory and checkpoint disk of a training run from its "
              "config (same keys as `falcon-qlora train`), without downloading the model, for the profile the run "
              "would take, plus a table of all three profiles. --gpu_memory: the free GPU memory to assume for "
              "auto/speed (default: this GPU's, else 16 and 80 GiB).")
        return 0
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    device = _take(argv, "--device") or "cuda"
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device {device!r}: use cuda or cpu")
    gib = _take(argv, "--gpu_memory")
    try:
        free = [int(float(gib) * GiB)] if gib is not None else None
    except ValueError:
        raise UserError(f"--gpu_memory {gib!r}: give the free GPU memory in GiB, e.g. --gpu_memory 40") from None
    from .config import parse_args
    cfg = parse_args(argv)
    if as_json:
        est = estimate(cfg, device=device, free_bytes=free[0] if free else None)
        print(json.dumps({**est, "profiles": profile_table(cfg, free or _free_bytes())}, indent=2))
    else:
        print(report(cfg, device, free))
    return 0


def _free_bytes() -> list[int]:
    import torch
    return [torch.cuda.mem_get_info()[0]] if torch.cuda.is_available() else [16 * GiB, 80 * GiB]


def report(cfg: RunConfig, device: str = "cuda", free_bytes: list[int] | None = None) -> str:
    """What `falcon-qlora estimate` prints (the notebook shows it too): the run's profile in detail, then all three.
    free_bytes: free GPU memory to plan with (default: this GPU's, else 16 and 80 GiB)."""
    given = free_bytes is not None
    free = free_bytes or _free_bytes()
    est = estimate(cfg, device=device, free_bytes=free[0] if given else None)
    text = render(est, cfg, profile_table(cfg, free))
    if not given and len(free) > 1:
        text += ("\n(no GPU here: speed rows assume 16 GiB free (a T4) and 80 GiB (an A100/H100); --gpu_memory GIB "
                 "to assume another)")
    return text
