"""`falcon-qlora estimate`: the memory and disk a run will need, from the config alone (nothing is downloaded and no
GPU is needed). plan.make_plan decides how the run is computed, memory.peak costs that plan; this module puts the
two together, renders them and is the command line.

    falcon-qlora estimate                                   # the reference recipe (Falcon-7B, built-in shapes)
    falcon-qlora estimate --config demo
    falcon-qlora estimate --per_device_train_batch_size 16 --gradient_checkpointing false --gpu_memory 40
    from falcon_qlora.estimate import estimate; estimate(load_config("reference"))   # -> dict of bytes
"""
from __future__ import annotations

import json

from .config import RunConfig
from .errors import UserError
from .memory import GiB, disk_estimate, peak
from .plan import RunPlan, make_plan, with_split


def estimate(cfg: RunConfig, device: str = "cuda", profile: str | None = None, free_bytes: int | None = None, *,
             parts=None, split: tuple | None = None, plan: RunPlan | None = None) -> dict:
    """Peak training memory on one device (bytes) and the disk the run's checkpoints take, for `plan`, or for the
    plan make_plan(cfg, free_bytes, device=device, profile=profile, parts=parts) makes: profile None -> cfg.profile,
    auto resolved as training resolves it (free_bytes: the GPU's free memory to assume). device: "cuda" (what a
    GPU run needs) or "cpu" (how the tests measure it: fp32, no fused kernels). parts, split (the benchmark's
    variants): a subset of the profile's changes (plan.PROFILE_PARTS) and an exact (micro_batch, accumulation,
    checkpointing, offload)."""
    if plan is None:
        plan = make_plan(cfg, free_bytes, device=device, profile=profile, parts=parts)
    if split:
        plan = with_split(plan, *split)
    mem = peak(cfg, plan)
    return dict(model=cfg.model_name_or_path, device=plan.device, profile=plan.profile, profile_reason=plan.reason,
                micro_batch=plan.micro_batch, accumulation=plan.accumulation, checkpointing=plan.checkpointing,
                offload=plan.offload, optim=plan.optim, **mem, **disk_estimate(cfg, mem["lora_params"]))


PROFILE_ORDER = ("reference", "memory", "speed")


def profile_table(cfg: RunConfig, free_bytes: list[int]) -> list[dict]:
    """One row per profile (speed once per assumed free GPU memory): split, checkpointing, peak GPU and host."""
    rows, picks = [], {f: make_plan(cfg, f, device="cuda", profile="auto").profile for f in free_bytes}
    for name in PROFILE_ORDER:
        for free in (free_bytes if name == "speed" else free_bytes[:1]):
            e = estimate(cfg, "cuda", name, free)
            auto = [f for f in (free_bytes if name != "speed" else [free]) if picks[f] == name]
            rows.append(dict(profile=name, free_bytes=free if name == "speed" else None, auto_at=auto,
                             **{k: e[k] for k in ("micro_batch", "accumulation", "checkpointing", "offload",
                                                  "peak_bytes", "host_bytes")}))
    return rows


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
        *([f"  dequantized weights (bf16)  {g(est['weight_cache_bytes'])}   (speed: dequantized once, not each step)"]
          if est.get("weight_cache_bytes") else []),
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


def parser():
    from .cli import CommandParser
    p = CommandParser(prog="falcon-qlora estimate", allow_abbrev=False, description="Estimates GPU memory and checkpoint disk of a "
                      "training run from its config (same keys as `falcon-qlora train`, e.g. --max_length 2048), "
                      "without downloading the model, for the profile the run would take, plus a table of all "
                      "three profiles.")
    p.add_argument("--config", default=None, help="a preset name or a YAML file (default: the reference recipe)")
    p.add_argument("--profile", default=None, choices=("auto", "reference", "speed", "memory"),
                   help="the profile to model (default: the config's)")
    p.add_argument("--gpu_memory", default=None, metavar="GIB",
                   help="free GPU memory to assume for auto/speed (default: this GPU's, else 16 and 80 GiB)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="what to model: a GPU run or a CPU one")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p


def cli(argv: list[str]) -> int:
    """`falcon-qlora estimate [--config PRESET_OR_YAML] [--key value ...] [--profile auto|reference|speed|memory]
    [--gpu_memory GIB] [--device cuda|cpu] [--json]`"""
    args, overrides = parser().parse_known_args(list(argv))
    try:
        free = [int(float(args.gpu_memory) * GiB)] if args.gpu_memory is not None else None
    except ValueError:
        raise UserError(f"--gpu_memory {args.gpu_memory!r}: give the free GPU memory in GiB, e.g. --gpu_memory 40") \
            from None
    from .config import parse_args
    config = ["--config", args.config] if args.config else []
    cfg = parse_args(config + overrides + (["--profile", args.profile] if args.profile else []))
    if args.json:
        est = estimate(cfg, device=args.device, free_bytes=free[0] if free else None)
        print(json.dumps({**est, "profiles": profile_table(cfg, free or _free_bytes())}, indent=2))
    else:
        print(report(cfg, args.device, free))
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
