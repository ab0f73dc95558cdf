"""The memory profile's optimizer: the reference's paged AdamW 32-bit, stepped by one fused kernel.

    opt = PagedAdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)   # what Trainer builds

bitsandbytes' paged AdamW keeps the two fp32 moments in CUDA unified memory: they never count against the GPU's
allocator, and the driver pages them out to the host under memory pressure. It steps each LoRA tensor with a Python
call, a kernel and a device-wide wait of its own, though: for Falcon-7B's 256 LoRA tensors ~24 ms of a memory-profile
step for ~3 ms of kernels (bench/NOTES.md). PagedAdamW is torch's fused AdamW (the same update, hyper-parameters and
fp32 moments; the speed profile's optimizer) over every tensor in one launch, with its moments as views of two flat
buffers that bitsandbytes allocates in unified memory, prefetched to the GPU before each step as bitsandbytes does.
On a CPU the moments are plain tensors (bitsandbytes' paged optimizers fall back the same way).
"""
from __future__ import annotations

import torch

from .errors import UserError


class PagedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW(fused=True) whose moments live in two flat unified-memory buffers (plain memory on a CPU)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self._buffers = None  # [(flat exp_avg, its bitsandbytes handle), (flat exp_avg_sq, handle)]
        self._page_states()

    def _page_states(self) -> None:
        """Point every parameter's moments at its slice of the flat buffers, copying values already there (a loaded
        state_dict) and starting the rest at zero, as AdamW does."""
        params = [p for g in self.param_groups for p in g["params"]]
        bad = [tuple(p.shape) for p in params if p.dtype != torch.float32]
        if bad or len({p.device for p in params}) > 1:
            raise UserError(f"the memory profile's optimizer steps fp32 LoRA weights on one device; got "
                            f"{len(bad)} tensors of another dtype and devices {sorted({str(p.device) for p in params})}"
                            f": set profile=reference, which keeps bitsandbytes' paged AdamW")
        if not params:
            return
        if self._buffers is None:
            n, device = sum(p.numel() for p in params), params[0].device
            self._buffers = [unified_zeros(n, device), unified_zeros(n, device)]
        offset = 0
        for p in params:
            state = self.state[p]
            for key, (flat, _) in zip(("exp_avg", "exp_avg_sq"), self._buffers):
                view = flat[offset:offset + p.numel()].view_as(p)
                if key in state and state[key].data_ptr() != view.data_ptr():
                    view.copy_(state[key])
                state[key] = view
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)  # as fused AdamW keeps it
            offset += p.numel()

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # bitsandbytes' checkpoints: convert_adamw_state first (SafeTrainer)
        self._page_states()  # torch put the loaded moments in device memory: back into the buffers

    @torch.no_grad()
    def step(self, closure=None):
        if self._buffers:
            for _, handle in self._buffers:
                if handle is not None:  # bring pages the driver moved to the host back before the kernel reads them
                    import bitsandbytes.functional as F
                    F.prefetch_tensor(handle)
        return super().step(closure)


def convert_adamw_state(state_dict: dict, optimizer) -> dict:
    """A checkpoint's AdamW state in the form `optimizer` loads. bitsandbytes' AdamW 32-bit (the reference's) and
    torch's (the profiles') keep the same two fp32 moments and step count under other names, so a run resumes under
    another profile than it began with (train.build_trainer's SafeTrainer applies this when it resumes)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if type(opt).__module__.startswith("bitsandbytes"):
        return _to_bitsandbytes(state_dict, getattr(getattr(opt, "args", None), "optim_bits", 32))
    return _from_bitsandbytes(state_dict) if isinstance(opt, torch.optim.AdamW) else state_dict


def _to_bitsandbytes(state_dict: dict, bits: int) -> dict:
    state = {}
    for key, s in state_dict["state"].items():
        if "exp_avg" in s and "state1" not in s:
            if bits != 32:
                raise UserError(f"the checkpoint holds 32-bit AdamW moments, which a {bits}-bit bitsandbytes "
                                "optimizer cannot take: resume with optim=paged_adamw_32bit")
            s = {"step": int(s["step"]), "state1": s["exp_avg"], "state2": s["exp_avg_sq"]}
        state[key] = s
    return {**state_dict, "state": state}


def _from_bitsandbytes(state_dict: dict) -> dict:
    """bitsandbytes' AdamW 32-bit keeps the same two moments as state1 / state2 and its step count as an int."""
    state = {}
    for key, s in state_dict["state"].items():
        moments = {**s, **s.get("__bnb_optimizer_quant_state__", {})}
        if "state1" in moments:
            if moments["state1"].dtype != torch.float32 or "state2" not in moments:
                raise UserError("the checkpoint's optimizer state is not 32-bit AdamW (an 8-bit or other "
                                "bitsandbytes optimizer): resume it with the optim and profile it was started with")
            s = {"step": torch.tensor(float(moments["step"])), "exp_avg": moments["state1"],
                 "exp_avg_sq": moments["state2"]}
        state[key] = s
    return {**state_dict, "state": state}


def unified_zeros(n: int, device: torch.device) -> tuple[torch.Tensor, object]:
    """(n fp32 zeros, bitsandbytes' handle) in CUDA unified memory, seen by torch as a CUDA tensor without a copy;
    (plain zeros, None) on other devices. The allocation lives as long as the process, as bitsandbytes' own do."""
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.float32, device=device), None
    import bitsandbytes.functional as F
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    handle = F.get_paged(n, dtype=torch.float32, device=device)  # a CPU-typed tensor over cudaMallocManaged memory

    class Unified:  # the CUDA array interface: torch wraps the pointer as a tensor on the device that owns it
        __cuda_array_interface__ = {"shape": (n,), "typestr": "<f4", "data": (handle.data_ptr(), False),
                                    "strides": None, "version": 2}
        keep = handle

    with torch.cuda.device(device):
        flat = torch.as_tensor(Unified(), device=device)
    flat.zero_()
    return flat, handle
