"""What a run achieves: real-token throughput, peak GPU memory and model FLOPs utilisation, in every log line.

The trainer adds these to each loss log (so they reach the progress line, metrics.jsonl and the end-of-run summary):
    tokens_per_second       real (non-padding) tokens trained per second since the previous log, all processes
    peak_gpu_memory_gib     torch.cuda.max_memory_allocated of this process so far
    mfu_percent             tokens/s x model FLOPs per token / (GPUs x the GPU's dense bf16/fp16 peak)
and, on the first one, the start-up time:
    seconds_to_first_step   from the start of `train` (data, model load and quantization, LoRA) to that log
"""
from __future__ import annotations

import time

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; fp16 for GPUs without bf16.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(device_name: str | None) -> float | None:
    """The datasheet peak of a GPU from its name (longest matching key first: "A10G" before "A10"), or None."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


def flops_per_token(model, lengths: list[int], lora_r: int) -> float:
    """Model FLOPs per trained token: forward + input-gradient backward of every frozen matmul weight (2 + 2 FLOP
    each; the base gets no weight gradient), LoRA (forward, input and weight gradients: 6 per weight), causal
    attention (forward + 2x backward) at the rows' real lengths. Recomputation is not counted."""
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    p_mm = lora = 0
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.Linear) and "lora_" not in name:
            p_mm += m.in_features * m.out_features
            if hasattr(getattr(m, "weight", None), "quant_state") or type(m).__name__ == "Linear4bit":
                lora += lora_r * (m.in_features + m.out_features)
    cfg = base.config
    n2 = sum(n * n for n in lengths) / max(1, sum(lengths))  # E[n^2]/E[n]: attention per token grows with length
    attn = cfg.num_hidden_layers * 3 * 2 * cfg.hidden_size * n2
    return 4 * p_mm + 6 * lora + attn


class Meter:
    """Fills the throughput fields of each loss log of one trainer (see the module docstring)."""

    def __init__(self, trainer, lora_r: int, max_length: int):
        import torch
        self.trainer, self.cuda = trainer, torch.cuda.is_available()
        self.last = None  # (time, tokens) at the previous log
        self.started = None  # when train() began, for the start-up time (set by train.train)
        self.flops = flops_per_token(trainer.model, [max_length], lora_r)  # rows at max_length: an upper bound
        self.peak = peak_tflops(torch.cuda.get_device_name() if self.cuda else None)

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0) or 0)

    def update(self, logs: dict) -> None:
        import torch
        if "loss" not in logs:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now, tokens = time.perf_counter(), self._tokens()
        if self.last is not None and now > self.last[0] and tokens > self.last[1]:
            tps = (tokens - self.last[1]) / (now - self.last[0])
            logs["tokens_per_second"] = round(tps, 1)
            if self.peak:
                gpus = max(1, self.trainer.args.world_size)
                logs["mfu_percent"] = round(100 * tps * self.flops / (gpus * self.peak * 1e12), 1)
        if self.cuda:
            logs["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.started is not None:
            logs["seconds_to_first_step"] = round(now - self.started, 1)
            self.started = None
        self.last = (now, tokens)

    def start(self) -> None:
        self.last = (time.perf_counter(), self._tokens())


def summary(log_history: list) -> str | None:
    """One line for the end of a run: mean throughput over its logs, the peak memory, the MFU."""
    rows = [x for x in log_history if "tokens_per_second" in x]
    if not rows:
        return None
    tps = sum(x["tokens_per_second"] for x in rows) / len(rows)
    parts = [f"{tps:,.0f} real tokens/s"]
    first = next((x["seconds_to_first_step"] for x in log_history if "seconds_to_first_step" in x), None)
    if first is not None:
        parts.append(f"first step {first:.0f} s after start")
    peak = max((x.get("peak_gpu_memory_gib", 0) for x in log_history), default=0)
    if peak:
        parts.append(f"peak GPU memory {peak:.2f} GiB")
    mfu = [x["mfu_percent"] for x in rows if "mfu_percent" in x]
    if mfu:
        parts.append(f"MFU {sum(mfu) / len(mfu):.1f} % of the GPU's dense peak")
    return "throughput: " + ", ".join(parts)
