"""How a run is computed: one RunPlan, made in one place from the config, the model's shape and the free GPU memory.

    plan = make_plan(cfg)                                            # this machine: its GPU's free memory, or a CPU
    plan = make_plan(cfg, free_bytes=80 * 2**30, device="cuda")      # an assumed GPU (estimate --gpu_memory 80)
    print(plan.describe())

train applies the plan (profiles.apply_profile) and records it, estimate costs it (memory.peak), doctor prints it.
The plan never changes what is learned: the rows per optimizer step are batch_policy's (distributed.split_batch),
only how they are split into micro-batches and which code paths compute them change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .config import RunConfig
from .errors import UserError

GiB = 2 ** 30
PROFILES = ("reference", "speed", "memory")
# The changes a profile makes (profiles.apply_profile applies each one; the benchmark picks subsets):
#   split: the micro-batch split and checkpointing below; padding_free: rows laid end to end; attention: Falcon
#   attention through SDPA per row; norms: layer-norm outputs in the compute dtype; lora: each LoRA layer as one GEMM;
#   optim: fused torch AdamW for paged bnb AdamW (the memory profile's keeps its moments in unified memory, as bnb's
#   does: optimizer.PagedAdamW); head_chunks: narrower tiles in TRL's fused LM head; offload:
#   checkpointed layer inputs in pinned host memory; weight_cache: the 4-bit weights dequantized once (kept only where
#   the speed split still fits with them); compile: torch.compile of each decoder layer; packed_masks: LoRA dropout
#   masks kept for backward as bits (in compiled layers); bf16_residual (benchmark only): the residual stream in bf16
#   too.
PARTS = ("split", "padding_free", "attention", "norms", "lora", "optim", "weight_cache", "compile")
PROFILE_PARTS = {"reference": (), "speed": PARTS,
                 "memory": ("split", "padding_free", "attention", "norms", "lora", "optim", "head_chunks", "offload",
                            "packed_masks", "compile")}
PAGED_FUSED_ADAM = "paged_adamw_32bit_fused"  # RunPlan.optim of the memory profile (optimizer.PagedAdamW)
COMPILE_CAPABILITY = (8, 0)  # compile is measured on Hopper; Triton's bf16 kernels want Ampere or newer
# compile_layers=auto compiles runs of at least this many steps. On the H200 the layers compile in ~20 s, and again
# (~20-40 s) when a new row layout first arrives; speed then gains 0.07 s per 512-token step over its eager layers
# and breaks even near 1,000 steps (memory gains 0.24 s per step). bench/NOTES.md rows 12-14.
COMPILE_MIN_STEPS = 1000
MEMORY_ROWS = 8      # rows per micro-batch of the memory profile (with offloading; measured in bench/RESULTS.md)
HEAD_CHUNK = 8192    # vocabulary columns per tile of TRL's fused LM head in the memory profile (TRL: 32768)
AUTO_MIN_ROWS = 4    # auto takes speed when at least this many rows per micro-batch fit without checkpointing
# The speed split must fit with this much to spare. The memory model is within 1% of the H200's measured peaks for
# the speed profile (47.52 vs 47.66 GiB at 16 x 512 tokens, 89.9 vs 90.2 GiB at 8 x 2048) and tests hold it within
# 15% of measured peaks; the allocator reserves more than it hands out (48.82 GiB reserved at 47.66 allocated) and the
# free memory read at the start moves. 15% covers the model's tested error bound, and with it those.
MARGIN = 1.15


@dataclass(frozen=True)
class RunPlan:
    """What one run computes, per process: rows per optimizer step = micro_batch x accumulation x processes."""
    profile: str
    reason: str            # why this profile: "as configured", or what auto saw
    micro_batch: int       # rows per micro-batch on each device
    accumulation: int
    checkpointing: bool
    offload: bool          # checkpointed layer inputs in pinned host memory
    optim: str
    norms: bool            # layer-norm outputs in the compute dtype (bf16/fp16 runs of the profiles)
    head_chunk: int | None  # vocabulary columns per LM-head tile (None: TRL's)
    padding_free: bool     # rows laid end to end by the collator (packing does it otherwise)
    parts: tuple = ()      # the profile's changes (PROFILE_PARTS)
    processes: int = 1
    policy: str = "effective"  # batch_policy
    device: str = "cuda"
    free_bytes: int | None = None  # the GPU memory the split was planned for

    @property
    def effective(self) -> int:
        return self.micro_batch * self.accumulation * self.processes

    def describe(self) -> str:
        n = self.processes
        text = (f"profile {self.profile} ({self.reason}); effective batch {self.effective} rows = {self.micro_batch} "
                f"per device x {self.accumulation} accumulation x {n} process{'es' if n > 1 else ''}"
                f"{f' (world size {n})' if n > 1 else ''}; checkpointing {'on' if self.checkpointing else 'off'}"
                f"{' (layer inputs in host memory)' if self.offload else ''}; optimizer {self.optim}")
        if n > 1:
            text += ("; batch_policy=effective: the effective batch is held fixed (accumulation divided among "
                     "processes)" if self.policy == "effective" else "; batch_policy=per_device: per-device batch "
                     "and accumulation are held fixed (the effective batch grows with processes)")
        changes = [p for p in self.parts if p not in ("split", "optim")]
        return text + (f"; {', '.join(changes)}" if changes else "")

    def as_metrics(self) -> dict:
        """What ran, for the run's metrics: the split each device really computed, not the config's."""
        return {"world_size": self.processes, "effective_batch": self.effective, "per_device_batch": self.micro_batch,
                "gradient_accumulation": self.accumulation, "profile": self.profile,
                "gradient_checkpointing": self.checkpointing, "offload": self.offload, "optim": self.optim}


def make_plan(cfg: RunConfig, free_bytes: int | None = None, processes: int | None = None, device: str | None = None,
              profile: str | None = None, parts=None) -> RunPlan:
    """The one place that decides how a run is computed.

    Args:
        free_bytes: free GPU memory to plan with (default: this GPU's; none on a CPU). Given with device="cuda" on a
            machine without a GPU, it stands for an assumed one (what `estimate --gpu_memory` plans with).
        processes: default the launch's WORLD_SIZE.
        device: "cuda" or "cpu" (default: this machine's).
        profile: default cfg.profile; auto resolves here.
        parts: the benchmark's subsets of a profile's changes (default PROFILE_PARTS[profile]).
    Raises:
        UserError: speed/memory under FSDP; an unknown profile. ConfigError (distributed.split_batch): an effective
            batch that does not divide among the processes.
    """
    from .distributed import split_batch, world_size
    n = processes or world_size()
    per_device, accumulation = split_batch(cfg, n)
    rows = per_device * accumulation  # rows each process computes per optimizer step
    cuda_here = _cuda()
    device = device or ("cuda" if cuda_here else "cpu")
    if free_bytes is None and device == "cuda" and cuda_here:
        import torch
        free_bytes = torch.cuda.mem_get_info()[0]
    profile, reason, speed_rows = _choose_profile(cfg, profile or cfg.profile, rows, free_bytes, device)
    if parts is None:
        parts = tuple(p for p in PROFILE_PARTS[profile] if p != "compile" or _compile_wanted(cfg, device))
    parts = tuple(parts)
    split = (per_device, accumulation, cfg.gradient_checkpointing, False)
    if profile == "speed" and "split" in parts:
        if speed_rows is None:
            speed_rows = speed_micro_batch(cfg, rows, free_bytes, parts) if free_bytes else 0
        if speed_rows:
            split = (speed_rows, rows // speed_rows, False, False)
        elif free_bytes:
            reason += f"; no micro-batch fits {free_bytes / GiB:.0f} GiB free without checkpointing: the config's split"
    elif profile == "memory" and "split" in parts:
        if "offload" in parts:
            mb = memory_micro_batch(cfg, rows, free_bytes, parts)
            if not mb:
                mb = 1
                reason += f"; even 1 row per micro-batch is estimated over {free_bytes / GiB:.0f} GiB free"
            split = (mb, rows // mb, True, True)
        else:
            split = (per_device, accumulation, True, False)
    elif profile != "reference":
        split = (per_device, accumulation, cfg.gradient_checkpointing, "offload" in parts)
    if "weight_cache" in parts:  # only beside a split planned for known free GPU memory, and where it still fits
        planned = device == "cuda" and free_bytes and not split[2]
        if not (planned and _fits(cfg, "speed", *split, parts, free_bytes)):
            parts = tuple(p for p in parts if p != "weight_cache")
            if planned:
                reason += "; no room for the dequantized weights beside this micro-batch: dequantized each step"
    return _plan(cfg, profile, reason, *split, parts, device, n, free_bytes)


def _plan(cfg: RunConfig, profile: str, reason: str, micro_batch: int, accumulation: int, checkpointing: bool,
          offload: bool, parts: tuple, device: str, processes: int = 1, free_bytes: int | None = None) -> RunPlan:
    from .memory import compute_bytes
    fused_adam = "optim" in parts and device == "cuda" and cfg.optim == "paged_adamw_32bit"
    # the memory profile keeps the moments out of the GPU's memory, as the reference does; speed has room for them
    optim = (PAGED_FUSED_ADAM if profile == "memory" else "adamw_torch_fused") if fused_adam else cfg.optim
    return RunPlan(profile, reason, micro_batch, accumulation, checkpointing, offload and checkpointing, optim=optim,
                   norms="norms" in parts and compute_bytes(cfg, device == "cuda") < 4,
                   head_chunk=HEAD_CHUNK if "head_chunks" in parts else None,
                   padding_free="padding_free" in parts and not cfg.packing, parts=parts, processes=processes,
                   policy=cfg.batch_policy, device=device, free_bytes=free_bytes)


def _choose_profile(cfg: RunConfig, wanted: str, rows: int, free_bytes: int | None,
                    device: str) -> tuple[str, str, int | None]:
    """(profile, why, speed micro-batch when auto had to cost it). auto -> speed where the GPU holds at least
    AUTO_MIN_ROWS rows per micro-batch (or the whole batch, if smaller) without checkpointing, else memory; reference
    on a CPU (the profiles' kernels only pay on a GPU) and under FSDP."""
    from .distributed import fsdp_enabled
    if wanted != "auto" and wanted not in PROFILES:
        raise UserError(f"profile={wanted} is not one of auto, {', '.join(PROFILES)}")
    if fsdp_enabled() and wanted in ("speed", "memory"):
        # the profiles patch LoRA and attention forwards in ways FSDP's flat parameters do not allow (measured:
        # "Output 0 of ViewBackward0 is a view ... modified inplace")
        raise UserError(f"profile={wanted} is not supported under FSDP: use profile=reference or auto")
    if wanted != "auto":
        return wanted, "as configured", None
    if fsdp_enabled():
        return "reference", "auto under FSDP", None
    if device != "cuda":
        return "reference", "auto on a CPU", None
    if free_bytes is None:
        return "reference", "auto with no GPU known (--gpu_memory to assume one)", None
    mb = speed_micro_batch(cfg, rows, free_bytes, PROFILE_PARTS["speed"])
    need, free = min(AUTO_MIN_ROWS, rows), f"{free_bytes / GiB:.0f} GiB free"
    if mb >= need:
        return "speed", f"auto: {mb} rows per micro-batch fit {free} without checkpointing", mb
    return "memory", f"auto: {mb} rows per micro-batch fit {free} without checkpointing, {need} wanted", None


def speed_micro_batch(cfg: RunConfig, rows: int, free_bytes: int, parts=PARTS) -> int:
    """The largest divisor of `rows` whose speed-profile peak (memory.peak of exactly that split, no checkpointing)
    times MARGIN fits in free_bytes; 0 if none does. Rows per micro-batch come first: the dequantized-weight cache
    is costed after (make_plan), since fewer launches gain more than it does."""
    parts = tuple(p for p in parts if p != "weight_cache")
    return next((mb for mb in _divisors(rows)
                 if _fits(cfg, "speed", mb, rows // mb, False, False, parts, free_bytes)), 0)


def _fits(cfg: RunConfig, profile: str, micro_batch: int, accumulation: int, checkpointing: bool, offload: bool,
          parts: tuple, free_bytes: int) -> bool:
    """The split's estimated peak (memory.peak) on a GPU, times MARGIN, fits in free_bytes."""
    from .memory import peak
    candidate = _plan(cfg, profile, "", micro_batch, accumulation, checkpointing, offload, tuple(parts), "cuda")
    return peak(cfg, candidate)["peak_bytes"] * MARGIN <= free_bytes


def memory_micro_batch(cfg: RunConfig, rows: int, free_bytes: int | None, parts=PROFILE_PARTS["memory"]) -> int:
    """The memory profile's rows per micro-batch: the largest divisor of `rows` up to MEMORY_ROWS (the fastest
    measured within the reference's memory) whose peak, checkpointed and offloaded, times MARGIN fits free_bytes
    (long rows on a small GPU take fewer); MEMORY_ROWS's divisor when the free memory is not known; 0 if none fits."""
    sizes = [m for m in _divisors(rows) if m <= MEMORY_ROWS]
    if not free_bytes:
        return sizes[0]
    return next((mb for mb in sizes if _fits(cfg, "memory", mb, rows // mb, True, True, parts, free_bytes)), 0)


def _compile_wanted(cfg: RunConfig, device: str) -> bool:
    if cfg.compile_layers != "auto":
        return cfg.compile_layers == "on"
    return cfg.max_steps >= COMPILE_MIN_STEPS and compiles(device)


def compiles(device: str) -> bool:
    """Whether the profiles compile their decoder layers here: a GPU of COMPILE_CAPABILITY or newer with Triton
    (a T4, a CPU, or an assumed GPU on a machine without one keep the eager layers)."""
    if device != "cuda" or not _cuda():
        return False
    import torch
    if torch.cuda.get_device_capability() < COMPILE_CAPABILITY:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def with_split(plan: RunPlan, micro_batch: int, accumulation: int, checkpointing: bool, offload: bool) -> RunPlan:
    """The same plan computed at another split (the benchmark's variants)."""
    return replace(plan, micro_batch=micro_batch, accumulation=accumulation, checkpointing=checkpointing,
                   offload=offload and checkpointing)


def _divisors(n: int) -> list[int]:
    """Micro-batch sizes that split n rows evenly, largest first."""
    return [m for m in range(n, 0, -1) if n % m == 0]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
