"""bitsandbytes' paged optimizers, stepped without a host sync per tensor (the memory profile's optimizer).

    cls_and_kwargs = without_syncs(args)    # SFTConfig -> (class, kwargs) for SFTTrainer(optimizer_cls_and_kwargs=...)

bitsandbytes waits for the whole GPU after updating each parameter (`torch.cuda.synchronize()` in
Optimizer8bit.step): for Falcon-7B's 256 LoRA tensors that is 256 round trips a step with the GPU idle between
them. The update kernels and the prefetches of the paged states are all queued on the current stream, in order, so
nothing needs that wait; the arithmetic is bitsandbytes' own, kernel for kernel. The host reads the states only when
they are saved, and state_dict() waits for the last step first.
"""
from __future__ import annotations

import functools


def without_syncs(args, model=None):
    """(optimizer class, kwargs) as transformers' Trainer builds them from `args`, the class replaced by its
    sync-free twin when it is a paged bitsandbytes optimizer; None otherwise (the Trainer's own choice stands)."""
    from transformers import Trainer
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if not (kwargs.get("is_paged") and _is_bnb(cls)):
        return None
    return unsynced(cls), kwargs


def _is_bnb(cls) -> bool:
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, Optimizer8bit)


@functools.cache
def unsynced(cls):
    """A subclass of bitsandbytes optimizer `cls` whose step() queues every update without waiting for the GPU."""
    import torch

    class Unsynced(cls):
        _done = None  # a CUDA event recorded after the last step's kernels

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            cuda = False
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    cuda = cuda or p.is_cuda
            if cuda:
                self._done = torch.cuda.Event()
                self._done.record()
            return loss

        def _wait(self):
            if self._done is not None:
                self._done.synchronize()

        def state_dict(self, *a, **kw):  # paged states are host-visible memory the last step may still write
            self._wait()
            return super().state_dict(*a, **kw)

        def load_state_dict(self, *a, **kw):
            self._wait()
            return super().load_state_dict(*a, **kw)

    Unsynced.__name__ = Unsynced.__qualname__ = f"Unsynced{cls.__name__}"
    return Unsynced
