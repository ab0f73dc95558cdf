"""What a run really allocates, to hold `estimate` against: train a config for its few steps and take the peak.

    from falcon_qlora.measure import training_peak; training_peak(cfg)   # bytes, as estimate(cfg)["peak_bytes"]
"""
from __future__ import annotations

from .config import RunConfig


def training_peak(cfg: RunConfig, train_dataset=None) -> int:
    """Train as `falcon-qlora train` would (cfg.max_steps steps, no saving) and return the peak bytes of live tensors
    during the training steps, weights included: what `estimate(cfg)["peak_bytes"]` predicts. On a GPU this is
    torch.cuda.max_memory_allocated; torch keeps no CPU counter, so on a CPU the profiler's allocation events are
    replayed (each carries the allocator's running total)."""
    import torch
    from transformers import TrainerCallback
    from . import data as D
    from .model import attach_lora, load_base_model, load_tokenizer
    from .plan import make_plan
    from .train import build_trainer
    cfg = RunConfig(**{**cfg.__dict__, "save_steps": cfg.max_steps + 1, "eval_steps": None})
    cuda = torch.cuda.is_available()
    marker = 999_983  # an allocation of this odd size marks the start of training in the CPU event stream

    class Mark(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                del kwargs  # allocate and free the marker
                torch.empty(marker, dtype=torch.uint8)

    def run():
        train_ds, _ = D.load_dataset_splits(cfg, train_dataset, None)
        tok = load_tokenizer(cfg.model_name_or_path, cfg)
        plan = make_plan(cfg)  # as train makes it: before the model takes its share of the free memory
        model = attach_lora(load_base_model(cfg), cfg)
        build_trainer(cfg, model, tok, train_ds, None, callbacks=[Mark()], plan=plan).train()

    if cuda:
        run()
        return torch.cuda.max_memory_allocated()
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    events.sort()
    offset = events[0][2] - events[0][1]  # the running total counts from before this profile
    start = next(i for i, e in enumerate(events) if e[1] == marker)
    return max(e[2] for e in events[start + 2:]) - offset
