"""Checkpointed layer inputs in pinned host memory: the memory profile's way to fit bigger micro-batches.

    offload_layer_inputs(model)     # patch the decoder stack's forward; needs use_reentrant=True checkpointing
    remove_offload(model)           # (profiles.remove_profile does it too)

With gradient checkpointing the GPU still keeps every layer's input (rows x length x hidden, fp32 residual stream):
32 x 74 MB at 8 rows of 512 for Falcon-7B, most of the activation memory. Here those tensors are copied to pinned host
memory on a side stream while the next layers compute, and back on that stream one layer ahead of backward (while
the layer after it recomputes); nothing waits on the host, so no step is synchronised.
Reentrant checkpointing saves its inputs through autograd's saved-tensor hooks, so the hooks see exactly those
tensors; tensors saved outside the checkpointed layers (the final norm's input) are moved too when large enough.
"""
from __future__ import annotations

import types

from .fast_paths import decoder_stack

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: a copy would cost more than it frees


class _Packed:
    """One saved tensor in host memory: `done` marks its copy there (None: a CPU run's plain copy); `gpu`/`ready` a
    copy back already on its way; `prev` the tensor saved before it (backward wants it next)."""
    __slots__ = ("device", "host", "done", "prev", "gpu", "ready", "used")

    def __init__(self, device, host, done, prev):
        self.device, self.host, self.done, self.prev = device, host, done, prev
        self.gpu = self.ready = None
        self.used = False


class HostOffload:
    """A pack/unpack pair for torch.autograd.graph.saved_tensors_hooks. On a CPU the "host copy" is a plain copy,
    so the tests exercise the same path; `packed` and `packed_bytes` count what went through it, `prefetched` the
    copies back that backward found already on the GPU."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.streams: dict = {}
        self.packed = 0
        self.packed_bytes = 0
        self.prefetched = 0
        self.last = None  # the latest _Packed: backward walks back from it

    def pack(self, t):
        import torch
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or t.layout != torch.strided:
            return t
        self.packed += 1
        self.packed_bytes += nbytes
        if t.device.type != "cuda":
            return _Packed(t.device, t.detach().clone(), None, None)
        compute = torch.cuda.current_stream(t.device)
        side = self._side(t.device)
        side.wait_stream(compute)  # the tensor is complete before it is copied
        with torch.cuda.stream(side):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        t.record_stream(side)  # the allocator must not reuse its memory before the copy has read it
        self.last = _Packed(t.device, host, done, self.last)
        return self.last

    def unpack(self, packed):
        import torch
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.done is None:  # a CPU run's plain copy
            return packed.host.to(packed.device)
        compute = torch.cuda.current_stream(packed.device)
        if packed.gpu is None:
            self._fetch(packed)
        else:
            self.prefetched += 1
        compute.wait_event(packed.ready)  # GPU-side waits: the host never blocks
        t, packed.gpu, packed.used = packed.gpu, None, True
        t.record_stream(compute)  # made on the side stream, used (and freed) on this one
        self._prefetch(packed)
        return t

    def _side(self, device):
        import torch
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = torch.cuda.Stream(device)
        return side

    def _fetch(self, packed) -> None:
        """Start the copy back of `packed` on the side stream, after its copy to the host has finished."""
        import torch
        side = self._side(packed.device)
        side.wait_event(packed.done)
        with torch.cuda.stream(side):
            packed.gpu = packed.host.to(packed.device, non_blocking=True)
            packed.ready = torch.cuda.Event()
            packed.ready.record(side)

    def _prefetch(self, packed) -> None:
        """Backward unpacks saved tensors in the reverse order of forward: start copying back the ones saved just
        before `packed`, up to and including the next one as large as it (the previous layer's input), so that copy
        runs while this layer recomputes. At most one layer input is on its way at a time."""
        size = packed.host.numel()
        p = packed.prev
        while p is not None:
            if not p.used and p.gpu is None:
                self._fetch(p)
            if p.host.numel() >= size:
                break
            p = p.prev


def offload_layer_inputs(model, min_bytes: int = MIN_BYTES) -> HostOffload:
    """Run the decoder stack's training forwards under HostOffload's hooks. Returns the hooks (for their counters)."""
    stack = decoder_stack(model)
    if "forward" in stack.__dict__ and hasattr(stack, "_fq_offload"):
        return stack._fq_offload
    stack._fq_offload = HostOffload(min_bytes)
    stack.forward = types.MethodType(_offloaded_forward, stack)
    return stack._fq_offload


def _offloaded_forward(self, *args, **kwargs):
    import torch
    stock = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return stock(self, *args, **kwargs)
    hooks = self._fq_offload
    hooks.last = None  # each forward's saved tensors are a chain of their own
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return stock(self, *args, **kwargs)


_offloaded_forward._fq_patched = True


def remove_offload(model) -> None:
    stack = decoder_stack(model)
    if getattr(stack.__dict__.get("forward"), "_fq_patched", False):
        del stack.forward
    stack.__dict__.pop("_fq_offload", None)
