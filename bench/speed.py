"""Throughput and memory of the reference recipe and of each profile, on one GPU, in one run.

Builds a random-init Falcon-7B (same shapes and FLOPs as the real one; the hub is not needed), loads it once in 4-bit
through falcon_qlora.model, and runs every variant on the same rows through the package's own path
(attach_lora -> train.sft_config -> profiles.apply_profile -> TRL SFTTrainer, LoRA master weights in fp32):

    python bench/speed.py --out results/                 # GPU: the full benchmark (~6 min on an H200)
    python bench/speed.py --out /tmp/b --tiny            # CPU: the same flow on the tiny test Falcon (smoke test)

Writes results.json (every figure below, per variant) and prints a table: real (non-padding) tokens/s, peak
allocated/reserved memory, MFU against the bf16 matmul peak measured in the same run, first losses; plus the LoRA
gradient agreement of each profile with the reference path on one batch (dropout off) and the top GPU kernels of one
optimizer step of the reference and of the speed profile (torch profiler).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

import torch  # noqa: E402

VOCAB = 65024
T0 = time.time()
RESULTS: dict = {"variants": {}}


# Logged as the reference recipe logs (every 10 steps): a log reads the loss back from the GPU, and Trainer then
# collates the next batch while the GPU waits; logging every step would charge that wait to every step. Per-step
# losses come from falcon-qlora's NaN check instead, which reads them behind CUDA events.
LOGGING_STEPS = 10


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------------ the model
def build_falcon7b(path: Path) -> None:
    """Random bf16 Falcon-7B and a word-level tokenizer (w0 .. w65015 plus the chat markers)."""
    from common import save_word_tokenizer
    from transformers import FalconConfig, FalconForCausalLM
    save_word_tokenizer(path, VOCAB)
    cfg = FalconConfig(vocab_size=VOCAB, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                       multi_query=True, parallel_attn=True, bias=False, alibi=False,
                       new_decoder_architecture=False, bos_token_id=VOCAB - 8, eos_token_id=VOCAB - 8)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = FalconForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    m.save_pretrained(path, safe_serialization=True)
    del m
    gc.collect()
    torch.cuda.empty_cache()


def build_tiny(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_falcon
    build_falcon(path, new_decoder_architecture=False)


# ------------------------------------------------------------------------------------------------ the data
def full_rows(n: int, seed: int = 0, words: int = VOCAB - 8, answer: tuple = (400, 900)) -> list[dict]:
    """Rows longer than 512 tokens (truncated to max_length): the reference baseline's data. answer=(2000, 2600)
    gives rows longer than Falcon-7B's 2048-token context, for the long-row variants."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        h = " ".join(f"w{r.randrange(words)}" for _ in range(r.randrange(40, 200)))
        a = " ".join(f"w{r.randrange(words)}" for _ in range(r.randrange(*answer)))
        out.append({"text": f"### Human: {h} ### Assistant: {a}"})
    return out


def chat_rows(n: int, seed: int = 1, words: int = VOCAB - 8, median: int = 300, sigma: float = 0.79) -> list[dict]:
    """Long-tailed chat lengths: log-normal tokens per row, median ~300, P(>512) ~ 0.25 (sigma = ln(512/300)/0.674)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        total = max(12, int(r.lognormvariate(math.log(median), sigma)))
        nh = max(2, int(total * r.uniform(0.1, 0.4)))
        na = max(2, total - nh - 5)  # 4 marker tokens + EOS
        h = " ".join(f"w{r.randrange(words)}" for _ in range(nh))
        a = " ".join(f"w{r.randrange(words)}" for _ in range(na))
        out.append({"text": f"### Human: {h} ### Assistant: {a}"})
    return out


def row_lengths(rows, tok, max_length):
    return [min(len(tok(x["text"])["input_ids"]) + 1, max_length) for x in rows]


# ------------------------------------------------------------------------------------------------ ceilings
def bench_fn(fn, n=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n / 1e3


def ceilings() -> dict:
    out = {}
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out["matmul_bf16_8192_TFLOPs"] = round(2 * 8192**3 / bench_fn(lambda: x @ w) / 1e12, 1)
    x = torch.randn(8192, 4544, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4544, 18176, device="cuda", dtype=torch.bfloat16)
    out["matmul_bf16_falcon_8192x4544x18176_TFLOPs"] = round(2 * 8192 * 4544 * 18176 / bench_fn(lambda: x @ w) / 1e12, 1)
    try:
        import bitsandbytes.functional as F
        W = torch.randn(18176, 4544, device="cuda", dtype=torch.bfloat16)
        q, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
        out["dequant_nf4_18176x4544_us"] = round(bench_fn(lambda: F.dequantize_4bit(q, st)) * 1e6, 1)
    except Exception as err:  # noqa: BLE001
        out["dequant_error"] = repr(err)[:200]
    # attention of one 16-row micro-batch of 512 tokens: the stock path (materialised mask, MQA) vs fused kernels
    import torch.nn.functional as Fn
    q = torch.randn(16, 71, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(16, 1, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(16, 1, 512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(512, 512, device="cuda", dtype=torch.bool).tril()[None, None].expand(16, 1, 512, 512)
    cases = {
        "stock_mask": lambda: Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "expand_causal": lambda: Fn.scaled_dot_product_attention(q, k.expand(-1, 71, -1, -1),
                                                                  v.expand(-1, 71, -1, -1), is_causal=True),
        "repeat_causal": lambda: Fn.scaled_dot_product_attention(q, k.repeat(1, 71, 1, 1), v.repeat(1, 71, 1, 1),
                                                                  is_causal=True),
    }
    for name, f in cases.items():
        try:
            g = torch.randn(16, 71, 512, 64, device="cuda", dtype=torch.bfloat16)
            out[f"attn_{name}_fwd_bwd_ms"] = round(bench_fn(lambda: f().backward(g), n=10) * 1e3, 2)
        except Exception as err:  # noqa: BLE001
            out[f"attn_{name}_error"] = repr(err)[:200]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            cases["expand_causal"]()
        out["flash_accepts_expanded_kv"] = True
    except Exception as err:  # noqa: BLE001
        out["flash_accepts_expanded_kv"] = repr(err)[:200]
    return out


# ------------------------------------------------------------------------------------------------ FLOPs
from falcon_qlora.throughput import flops_per_token  # noqa: E402  (the figure every `train` run logs its MFU with)
from falcon_qlora.throughput import peak_tflops as peak_tflops_spec  # noqa: E402


# ------------------------------------------------------------------------------------------------ one variant
TRACE_DIR = None  # where profiled variants write their chrome trace (main sets it to --out)


def gpu_idle(events, wall_ms: float) -> dict:
    """When the GPU ran nothing inside one profiled step: the union of its kernel and copy intervals against the
    step's wall time, and the longest gaps with the kernels on either side (what the GPU waited between)."""
    from torch.autograd import DeviceType
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA)
    busy, gaps = 0.0, []
    start, end, last = ks[0][0], ks[0][1], ks[0][2]
    for s, e, name in ks[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, last, name))
            start, end = s, e
        elif e > end:
            end = e
        if e >= end:
            last = name
    busy += end - start
    span = ks[-1][1] - ks[0][0]
    gaps.sort(reverse=True)
    return {"wall_ms": round(wall_ms, 1), "kernel_span_ms": round(span / 1e3, 1), "busy_ms": round(busy / 1e3, 1),
            "idle_in_span_ms": round((span - busy) / 1e3, 1),
            "idle_in_gaps_over_50us_ms": round(sum(g for g, _, _ in gaps if g > 50) / 1e3, 1),
            "gaps": len(gaps), "longest": [[round(g / 1e3, 2), a[:70], b[:70]] for g, a, b in gaps[:15]]}


def callbacks(state: dict, prof_step, grab_grads: bool):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Step ends as CUDA events, read after training: a host sync per step would stall the GPU between steps,
        which `falcon-qlora train` never does (it reads the loss only every logging step)."""
        def on_step_end(self, args, st, control, **k):
            ev = None
            if torch.cuda.is_available():
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
            state["stamps"].append((time.time(), state["trainer"]._total_train_tokens, ev))

    first, count = prof_step if isinstance(prof_step, tuple) else (prof_step, 1)  # (first step, steps in a row)

    class Prof(TrainerCallback):
        p = None

        def on_step_begin(self, args, st, control, **k):
            if st.global_step == first:
                torch.cuda.synchronize()
                from torch.profiler import ProfilerActivity, profile
                Prof.p = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                Prof.p.__enter__()
                Prof.t = time.time()

        def on_step_end(self, args, st, control, **k):
            if Prof.p is not None and st.global_step >= first + count:
                torch.cuda.synchronize()
                Prof.p.__exit__(None, None, None)
                ka = Prof.p.key_averages()
                wall = time.time() - Prof.t
                from torch.autograd import DeviceType
                kern = [e for e in ka if e.device_type == DeviceType.CUDA]
                tot = sum(e.self_device_time_total for e in kern)
                top = sorted(kern, key=lambda e: -e.self_device_time_total)[:30]
                kinds = {}  # kernel time by kind: GEMMs, attention, dropout, other element-wise, copies
                for e in kern:
                    k = e.key.lower()
                    kind = ("gemm" if any(x in k for x in ("nvjet", "gemm", "cutlass", "sm90_xmma")) else
                            "attention" if any(x in k for x in ("sdpa", "flash", "fmha")) else
                            "dropout" if "dropout" in k else "copy" if "memcpy" in k or "copy" in k else
                            "triton" if k.startswith("triton") else "other")
                    kinds[kind] = kinds.get(kind, 0) + e.self_device_time_total
                state["profile"] = {"kernel_ms_per_step": round(tot / 1e3 / count, 1), "steps": count,
                                    "wall_ms": round(wall * 1e3, 1),
                                    "kernel_ms_by_kind": {k: round(v / 1e3, 1) for k, v in sorted(kinds.items())},
                                    "top_kernels": [
                    [round(e.self_device_time_total / 1e3, 2), round(100 * e.self_device_time_total / tot, 1),
                     e.count, e.key[:120]] for e in top]}
                try:
                    state["profile"]["gpu_idle"] = gpu_idle(Prof.p.events(), wall * 1e3)
                    if count > 1:  # steps in a row, no sync between them: the steady state's own gaps
                        gi = state["profile"]["gpu_idle"]
                        gi["per_step_ms"] = {k: round(gi[k] / count, 1) for k in
                                             ("kernel_span_ms", "busy_ms", "idle_in_span_ms")}
                except Exception as err:  # noqa: BLE001 - the table above is the result; this is a detail
                    state["profile"]["gpu_idle"] = repr(err)[:200]
                if TRACE_DIR is not None:  # the whole trace, for Perfetto / chrome://tracing
                    import gzip
                    import shutil
                    raw = Path(TRACE_DIR) / f"trace_{state['name']}.json"
                    Prof.p.export_chrome_trace(str(raw))
                    with open(raw, "rb") as f, gzip.open(str(raw) + ".gz", "wb") as g:
                        shutil.copyfileobj(f, g)
                    raw.unlink()
                Prof.p = None

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, st, control, **k):
            if "grads" not in state:
                state["grads"] = {n: p.grad.detach().float().flatten().cpu()
                                  for n, p in k["model"].named_parameters() if p.requires_grad and p.grad is not None}

    cbs = [Clock()]
    if prof_step is not None and torch.cuda.is_available():
        cbs.append(Prof())
    if grab_grads:
        cbs.append(Grads())
    return cbs


def run_variant(name, base, tok, rows, *, profile="reference", parts=None, steps=8, warm=3, prof_step=None,
                grab_grads=False, randomize_b=False, flops_lengths=None, peak_tflops=None, trainer_parts=None,
                memory_rows=None, args_over=None, fast_paths_over=None, train_over=None, safety_over=None, **over):
    """One training run through the package's path on the shared 4-bit base; the base is restored afterwards.
    parts: an ablation through TRL's plain SFTTrainer. trainer_parts / memory_rows: `falcon-qlora train`'s trainer
    (build_trainer) with plan.PROFILE_PARTS[profile] / the memory profile's rows per micro-batch replaced.
    args_over: SFTConfig fields set after the profile (ablations only). fast_paths_over / train_over / safety_over:
    falcon_qlora.fast_paths / .train / .safety module settings for this variant only (e.g. ATEN_DROPOUT)."""
    from falcon_qlora import fast_paths, safety, train
    mods = ((fast_paths, fast_paths_over), (train, train_over), (safety, safety_over))
    saved = [(m, k, getattr(m, k)) for m, o in mods for k in (o or {})]
    for m, o in mods:
        for k, v in (o or {}).items():
            setattr(m, k, v)
    try:
        return _run_variant(name, base, tok, rows, profile, parts, steps, warm, prof_step, grab_grads, randomize_b,
                            flops_lengths, peak_tflops, trainer_parts, memory_rows, args_over, over)
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def _run_variant(name, base, tok, rows, profile, parts, steps, warm, prof_step, grab_grads, randomize_b,
                 flops_lengths, peak_tflops, trainer_parts, memory_rows, args_over, over):
    from datasets import Dataset
    from transformers.trainer_utils import set_seed
    from trl import SFTTrainer
    from falcon_qlora import profiles as P
    from falcon_qlora.config import load_config
    from falcon_qlora.model import attach_lora, resolve_compute_dtype
    from falcon_qlora.train import sft_config
    cfg = load_config(None, **{**BASE_OVER, "max_steps": steps, "profile": profile, **over})
    set_seed(cfg.seed)
    model = attach_lora(base, cfg)
    if randomize_b:  # LoRA B starts at zero, which makes every lora_A gradient zero: give it values to compare
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype))
    state = {"stamps": [], "name": name}
    cbs = callbacks(state, prof_step, grab_grads)
    ds = Dataset.from_list(rows)
    from falcon_qlora import plan as PL
    if parts is None:  # a profile as users get it: falcon_qlora.train.build_trainer applies its plan
        from falcon_qlora.train import build_trainer
        plan = PL.make_plan(cfg, parts=trainer_parts)
        if memory_rows:  # the memory profile at another number of rows per micro-batch
            per_step = plan.micro_batch * plan.accumulation
            mb = next(m for m in PL._divisors(per_step) if m <= memory_rows)
            plan = PL.with_split(plan, mb, per_step // mb, True, True)
        trainer = build_trainer(cfg, model, tok, ds, None, callbacks=cbs, plan=plan)
        model, args, extra = trainer.model, trainer.args, {"data_collator": None} if _padding_free(trainer) else {}
    else:  # an ablation: the same steps as build_trainer, with a subset of the profile's changes
        plan = PL.make_plan(cfg, parts=parts)
        args = sft_config(cfg, tok, resolve_compute_dtype(cfg), plan)
        model, args, extra = P.apply_profile(model, args, plan, tok)
        for k, v in (args_over or {}).items():
            setattr(args, k, v)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=cbs, **extra)
        for p in trainer.model.parameters():  # as falcon_qlora.train.build_trainer: fp32 LoRA master weights
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    state["trainer"] = trainer
    if hasattr(trainer, "_check"):  # falcon-qlora's trainer: every step's loss, read behind events (no host sync)
        step_losses, real_check = {}, trainer._check

        def check(what, value, step):
            if what == "loss":  # micro-batch losses are each normalised by the step's token count: they add up
                step_losses[step] = step_losses.get(step, 0.0) + float(value)
            return real_check(what, value, step)
        trainer._check = check
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        state["allocated_before_train_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    t = time.time()
    err = None
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError as e:  # a variant that does not fit is a result, not a crash
        err = "OOM: " + str(e)[:160]
    except Exception as e:  # noqa: BLE001 - record it; the shared base must still be restored below
        import traceback
        traceback.print_exc()
        err = repr(e)[:300]
    res = {"profile": profile, "parts": list(parts) if parts is not None else None,
           "micro_batch": args.per_device_train_batch_size, "accumulation": args.gradient_accumulation_steps,
           "checkpointing": args.gradient_checkpointing, "packing": cfg.packing,
           "offload": any(hasattr(m, "_fq_offload") for m in model.modules()) or bool(getattr(args, "activation_offloading", False)),
           "padding_free": "data_collator" in extra or cfg.packing, "steps": steps, "train_s": round(time.time() - t, 1)}
    if err:
        res["error"] = err
    s = state["stamps"]
    if s and s[0][2] is not None:  # GPU time between step ends, from the events; host time before the first
        torch.cuda.synchronize()
        s = [(s[0][0] + s[0][2].elapsed_time(e) / 1e3, n, e) for _, n, e in s]
    if s:  # model set-up, data and (with compile) the compilation, then the first step
        res["first_step_s"] = round(s[0][0] - t, 1)
    if warm >= 1 and len(s) > warm:
        dt = s[-1][0] - s[warm - 1][0]
        res["tokens_per_s"] = round((s[-1][1] - s[warm - 1][1]) / dt)
        res["s_per_step"] = round(dt / (len(s) - warm), 3)
        res["tokens_per_step"] = round((s[-1][1] - s[warm - 1][1]) / (len(s) - warm))
        res["step_ms"] = [round((b[0] - a[0]) * 1e3, 1) for a, b in zip(s, s[1:])]
        if flops_lengths:
            f = flops_per_token(model, flops_lengths, cfg.lora_r)
            res["gflop_per_token"] = round(f / 1e9, 2)
            if peak_tflops:  # against the bf16 matmul peak measured in this run
                res["mfu_pct"] = round(100 * res["tokens_per_s"] * f / (peak_tflops * 1e12), 1)
            spec = peak_tflops_spec(torch.cuda.get_device_name() if cuda else None)
            if spec:  # against the GPU's dense bf16 spec too (989 TFLOP/s on an H200)
                res["mfu_spec_pct"] = round(100 * res["tokens_per_s"] * f / (spec * 1e12), 1)
    if cuda:
        res["allocated_before_train_GiB"] = state["allocated_before_train_GiB"]
        res["peak_alloc_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    res["losses"] = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    if hasattr(trainer, "_check") and step_losses:
        res["losses"] = [round(step_losses[k], 4) for k in sorted(step_losses)]
    if "profile" in state:
        res["torch_profile"] = state["profile"]
    grads = state.get("grads")
    restore(trainer, model)
    del trainer, model, state
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    log(name, json.dumps({k: v for k, v in res.items() if k != "torch_profile"}))
    return res, grads


def restore(trainer, model):
    """Give the shared base back its original state: no LoRA, no profile patches, no TRL fused LM head, no
    checkpointing hooks."""
    from falcon_qlora import profiles as P
    trainer.model_wrapped = trainer.model = None
    trainer.optimizer = trainer.lr_scheduler = None
    base = model.unload()
    P.remove_profile(base)
    base.__dict__.pop("forward", None)
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    try:
        base.disable_input_require_grads()
    except AttributeError:
        pass


def _padding_free(trainer) -> bool:
    return bool(getattr(trainer.data_collator, "padding_free", False))


def rel_err(g, ref, keys=None):
    keys = keys or [k for k in ref if k in g]
    a = torch.cat([g[k] for k in keys])
    b = torch.cat([ref[k] for k in keys])
    per = max(((g[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in keys)
    return {"rel_err": round(((a - b).norm() / b.norm()).item(), 5), "max_tensor_rel_err": round(per, 5),
            "tensors": len(keys)}


BASE_OVER: dict = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny test Falcon")
    ap.add_argument("--model-dir", default="/tmp/falcon7b-random")
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=540, help="skip the remaining variants after this long")
    ap.add_argument("--no-ceilings", action="store_true", help="skip the matmul/attention microbenchmarks")
    ap.add_argument("--build-only", action="store_true", help="write the random Falcon-7B to --model-dir and stop")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = a.tiny
    import transformers
    import trl
    import peft
    RESULTS["env"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                      "trl": trl.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "command": " ".join(sys.argv)}
    try:
        import bitsandbytes
        RESULTS["env"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        RESULTS["env"]["gpu"] = torch.cuda.get_device_name()
    if torch.cuda.is_available() and not (a.no_ceilings or a.build_only):
        try:
            RESULTS["ceilings"] = ceilings()
        except Exception as err:  # noqa: BLE001
            RESULTS["ceilings"] = {"error": repr(err)[:300]}
        torch.cuda.empty_cache()
        log("ceilings", RESULTS["ceilings"])
    peak = (RESULTS.get("ceilings") or {}).get("matmul_bf16_8192_TFLOPs")

    model_dir = Path(a.model_dir)
    if not (model_dir / "config.json").is_file():
        (build_tiny if tiny else build_falcon7b)(model_dir)
        log("built", model_dir)
    if a.build_only:
        return
    from falcon_qlora.config import load_config
    from falcon_qlora.model import count_linear4bit, load_base_model, load_tokenizer
    BASE_OVER.update(model_name_or_path=str(model_dir), output_dir="/tmp/bench-run", save_steps=100000,
                     logging_steps=LOGGING_STEPS, eval_split=None, disable_tqdm=True, save_total_limit=None, seed=42)
    if tiny:
        BASE_OVER.update(max_length=64, per_device_train_batch_size=2, gradient_accumulation_steps=2, lora_r=8)
    cfg0 = load_config(None, **BASE_OVER)
    t = time.time()
    tok = load_tokenizer(str(model_dir), cfg0)
    base = load_base_model(cfg0)
    RESULTS["load"] = {"load_s": round(time.time() - t, 1), "linear4bit": count_linear4bit(base)}
    log("loaded", RESULTS["load"])

    words = 300 if tiny else VOCAB - 8
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import guanaco_rows
        full = guanaco_rows(16 * 24, seed=0)
        chat = guanaco_rows(16 * 12, seed=1)
    else:
        full = full_rows(16 * 22, words=words)
        chat = chat_rows(16 * 12, words=words)
    long = full if tiny else full_rows(16 * 10, seed=2, words=words, answer=(2000, 2600))
    long_len = 128 if tiny else 2048  # Falcon-7B's context
    L = cfg0.max_length
    full_len = row_lengths(full[:64], tok, L)
    chat_len = row_lengths(chat, tok, L)
    RESULTS["data"] = {"full_mean_tokens": sum(full_len) / len(full_len),
                       "chat_median_tokens": sorted(row_lengths(chat, tok, 10**6))[len(chat) // 2],
                       "chat_share_over_max_length": sum(n > L for n in row_lengths(chat, tok, 10**6)) / len(chat),
                       "chat_mean_tokens_after_truncation": sum(chat_len) / len(chat_len)}
    log("data", RESULTS["data"])

    def save():
        (out / "results.json").write_text(json.dumps(RESULTS, indent=1))

    only = set(filter(None, a.only.split(",")))
    global TRACE_DIR
    TRACE_DIR = out
    steps_long = 4 if tiny else 20
    steps_mid = 4 if tiny else 12
    steps = 4 if tiny else 8
    # steps left out of tokens/s: compiled layers compile again when a row layout first changes (steps 2-5 here)
    warm = 1 if tiny else 6
    prof = None if tiny else 4  # inside the warm-up: writing the trace stalls the next step, which is step 6
    from falcon_qlora import plan as P
    mem_mb8 = dict(profile="memory", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                   parts=P.PROFILE_PARTS["memory"] + ("bf16_residual",))
    no_offload = tuple(x for x in P.PROFILE_PARTS["memory"] if x != "offload")
    eager = tuple(x for x in P.PARTS if x not in ("weight_cache", "compile"))
    V = [  # name, rows, kwargs; the ablations last (skipped first if time runs short)
        ("reference", full, dict(profile="reference", steps=steps_long)),
        ("speed", full, dict(profile="speed", steps=steps_long, prof_step=prof)),  # profiled in the warm-up
        ("memory", full, dict(profile="memory", steps=steps)),
        # the last two levers: compiled layers (compile_layers=on; auto compiles runs of 1,000 steps and more), and
        # the dequantized weights (in the speed profile where they fit) left out
        ("speed_compiled", full, dict(profile="speed", steps=steps_long, compile_layers="on")),
        ("memory_compiled", full, dict(profile="memory", steps=steps, compile_layers="on")),
        # LoRA dropout in the compiled layers through inductor's own random numbers instead of aten's kernel
        ("speed_compiled_inductor_dropout", full, dict(profile="speed", steps=steps_long, compile_layers="on",
                                                       fast_paths_over={"ATEN_DROPOUT": False})),
        ("memory_compiled_inductor_dropout", full, dict(profile="memory", steps=steps, compile_layers="on",
                                                        fast_paths_over={"ATEN_DROPOUT": False})),
        # the compiled speed profile's kernels in one steady-state step (its tokens/s carry the profiler's cost)
        ("speed_compiled_profiled", full, dict(profile="speed", steps=12, compile_layers="on", prof_step=10)),
        # three steady steps in a row under the profiler, no sync between them: does the GPU wait between steps?
        ("speed_compiled_profiled_3", full, dict(profile="speed", steps=14, compile_layers="on", prof_step=(10, 3))),
        # with the weight cache, the base layer and LoRA's B GEMM as two ops (inductor copies the base output first)
        ("speed_compiled_two_ops", full, dict(profile="speed", steps=steps_long, compile_layers="on",
                                              fast_paths_over={"LINEAR_LORA": False})),
        ("speed_two_ops", full, dict(profile="speed", steps=steps_long, fast_paths_over={"LINEAR_LORA": False})),
        # each step's start as before: a blocking copy of the batch and the row layout read back from the GPU (the
        # host waits for the previous step, then the GPU for the host); and the B GEMM added after the base GEMM
        ("speed_compiled_host_waits", full, dict(profile="speed", steps=steps_long, compile_layers="on",
                                                 train_over={"NON_BLOCKING_INPUTS": False},
                                                 fast_paths_over={"SEGMENTS_FROM_COLLATOR": False})),
        ("speed_compiled_lora_after", full, dict(profile="speed", steps=steps_long, compile_layers="on",
                                                 fast_paths_over={"LORA_FIRST": False})),
        ("memory_compiled_12_host_waits", full, dict(profile="memory", steps=steps_mid, compile_layers="on",
                                                     train_over={"NON_BLOCKING_INPUTS": False},
                                                     fast_paths_over={"SEGMENTS_FROM_COLLATOR": False})),
        # the memory profile over 12 steps (8 leave 3 measured after the recompiles), and one step profiled
        ("memory_compiled_12", full, dict(profile="memory", steps=steps_mid, compile_layers="on")),
        ("memory_compiled_20", full, dict(profile="memory", steps=steps_long, compile_layers="on")),  # loss check
        # the memory profile with bitsandbytes' paged AdamW (a kernel, a Python call and a wait per LoRA tensor)
        # instead of its fused one; and with Trainer's own per-step module walks and full garbage collections
        ("memory_compiled_12_bnb_optim", full, dict(profile="memory", steps=steps_mid, compile_layers="on",
                                                    trainer_parts=tuple(x for x in P.PROFILE_PARTS["memory"]
                                                                        if x != "optim"))),
        ("memory_compiled_12_trainer_walks", full, dict(profile="memory", steps=steps_mid, compile_layers="on",
                                                        safety_over={"LEAN_STEPS": False})),
        ("memory_compiled_inductor_dropout_12", full, dict(profile="memory", steps=steps_mid,
                                                           compile_layers="on", fast_paths_over={"ATEN_DROPOUT": False})),
        ("memory_compiled_profiled", full, dict(profile="memory", steps=12, compile_layers="on", prof_step=10)),
        # the memory profile with its dropout masks kept as bytes (run 17 also measured two levers since dropped: the
        # 4-bit base and LoRA B GEMMs as one op, "memory_compiled_12" there; the paged AdamW without its per-tensor
        # syncs, the one not in "memory_compiled_12_synced_optim")
        ("memory_compiled_12_byte_masks", full, dict(profile="memory", steps=steps_mid, compile_layers="on",
                                                     trainer_parts=tuple(x for x in P.PROFILE_PARTS["memory"]
                                                                         if x != "packed_masks"))),
        # three steady memory steps in a row under the profiler (trace written beside the results)
        ("memory_compiled_profiled_3", full, dict(profile="memory", steps=14, compile_layers="on",
                                                  prof_step=(10, 3))),
        ("speed_eager", full, dict(profile="speed", steps=steps_long, trainer_parts=eager)),
        ("speed_eager_compiled", full, dict(profile="speed", steps=steps_long, trainer_parts=eager + ("compile",))),
        # the memory profile at 16 rows per micro-batch, and without offloading (the reference's 4 x 4 split)
        ("memory_16x1", full, dict(profile="memory", steps=steps, memory_rows=16)),
        ("memory_4x4", full, dict(profile="memory", steps=steps, trainer_parts=no_offload)),
        # TRL's own activation offloading (SFTConfig.activation_offloading) instead of falcon_qlora.offload
        ("memory_8x2_trl_offload", full, dict(profile="memory", steps=steps, parts=no_offload,
                                              per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                              args_over={"activation_offloading": True})),
        ("memory_mb8", full, dict(steps=steps, **mem_mb8)),
        # rows of Falcon-7B's whole context (2048 tokens): what each profile gives on long rows
        ("reference_2048", long, dict(profile="reference", steps=steps if tiny else 6, max_length=long_len)),
        ("speed_2048", long, dict(profile="speed", steps=steps, max_length=long_len)),
        ("memory_2048", long, dict(profile="memory", steps=steps, max_length=long_len)),
        ("speed_2048_compiled", long, dict(profile="speed", steps=steps, max_length=long_len, compile_layers="on")),
        ("memory_2048_compiled", long, dict(profile="memory", steps=steps, max_length=long_len,
                                            compile_layers="on")),
        # levers, each alone: the residual stream in bf16 (speed); 16 rows per micro-batch at 2048 (memory)
        ("speed_bf16_residual", full, dict(profile="speed", steps=steps_long,
                                           trainer_parts=eager + ("bf16_residual",))),
        ("memory_2048_16x1", long, dict(profile="memory", steps=steps, max_length=long_len, memory_rows=16)),
        ("chat_reference", chat, dict(profile="reference", steps=steps)),
        ("chat_speed", chat, dict(profile="speed", steps=steps)),
        ("chat_speed_packing", chat, dict(profile="speed", steps=steps, packing=True)),
        ("chat_memory", chat, dict(profile="memory", steps=steps)),
        ("speed_lora_unfused", full, dict(profile="speed", steps=steps,
                                          parts=tuple(x for x in P.PARTS if x != "lora"))),
        ("speed_paged_adam", full, dict(profile="speed", steps=steps,
                                        parts=tuple(x for x in P.PARTS if x != "optim"))),
        # the memory profile without falcon_qlora's SafeTrainer (NaN checks): same parts, plain SFTTrainer
        ("memory_plain_trainer", full, dict(profile="memory", steps=steps, parts=P.PROFILE_PARTS["memory"])),
        ("memory_4x4_plain_trainer", full, dict(profile="memory", steps=steps, parts=no_offload)),
    ]
    G = [("reference", dict(profile="reference")), ("speed", dict(profile="speed")),
         ("memory", dict(profile="memory")), ("memory_mb8", mem_mb8),
         ("split_only", dict(profile="speed", parts=("split",))),
         ("speed_bf16_residual", dict(profile="speed", trainer_parts=eager + ("bf16_residual",))),
         ("speed_compiled", dict(profile="speed", compile_layers="on")),
         ("memory_compiled", dict(profile="memory", compile_layers="on"))]
    grads = {}
    for prof_name, gkw in G:
        key = f"grads_{prof_name}"
        if only and key not in only:
            continue
        try:
            _, g = run_variant(key, base, tok, full[:16], steps=1, warm=0, grab_grads=True,
                               randomize_b=True, lora_dropout=0.0, max_grad_norm=0.0, **gkw)
            grads[prof_name] = g
        except Exception as err:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            RESULTS[key + "_error"] = repr(err)[:300]
    if "reference" in grads:
        RESULTS["grad_check"] = {}
        for k, g in grads.items():
            if k != "reference" and g is not None:
                RESULTS["grad_check"][k] = {
                    "all": rel_err(g, grads["reference"]),
                    "lora_A": rel_err(g, grads["reference"], [n for n in grads["reference"] if "lora_A" in n]),
                    "lora_B": rel_err(g, grads["reference"], [n for n in grads["reference"] if "lora_B" in n])}
        log("grad_check", json.dumps(RESULTS["grad_check"]))
    del grads
    save()
    for name, rows, kw in V:
        if only and name not in only:
            continue
        if time.time() - T0 > a.budget_s:
            RESULTS["variants"][name] = {"skipped": "time budget"}
            continue
        lengths = chat_len if rows is chat else [long_len] * len(full_len) if kw.get("max_length") else full_len
        try:
            w = min(warm, max(1, kw.get("steps", steps) - 3))  # at least 3 steps measured
            res, _ = run_variant(name, base, tok, rows, warm=w, flops_lengths=lengths, peak_tflops=peak, **kw)
        except Exception as err:  # noqa: BLE001 - record and go on: one broken variant must not cost the run
            import traceback
            traceback.print_exc()
            res = {"error": repr(err)[:300]}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        res["ended_utc"] = time.strftime("%H:%M:%S", time.gmtime())  # to match GPU clock logs (gpu_speed.sh)
        RESULTS["variants"][name] = res
        save()
    v = RESULTS["variants"]
    ref_losses = v.get("reference", {}).get("losses")
    if ref_losses:  # each variant on the reference's rows and steps: its losses against the reference's
        RESULTS["loss_check"] = {
            k: {"steps": len(r["losses"]),
                "max_rel_diff": round(max(abs(x - y) / abs(x) for x, y in zip(ref_losses, r["losses"])), 5)}
            for k, r in v.items() if k != "reference" and len(r.get("losses") or []) == len(ref_losses)}
    save()
    print_table()


def print_table() -> None:
    ref = RESULTS["variants"].get("reference", {}).get("tokens_per_s")
    cref = RESULTS["variants"].get("chat_reference", {}).get("tokens_per_s")
    lref = RESULTS["variants"].get("reference_2048", {}).get("tokens_per_s")
    print("| variant | mb x acc | ckpt | tokens/s | vs ref | MFU % (measured peak, spec) | peak alloc GiB | peak reserved GiB | first losses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in RESULTS["variants"].items():
        if "tokens_per_s" not in r:
            print(f"| {name} | {r.get('error') or r.get('skipped')} |")
            continue
        base = cref if name.startswith("chat") else lref if "_2048" in name else ref
        x = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['micro_batch']} x {r['accumulation']} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['tokens_per_s']:,} | {x} | {r.get('mfu_pct', '-')}, {r.get('mfu_spec_pct', '-')} | {r.get('peak_alloc_GiB', '-')} | "
              f"{r.get('peak_reserved_GiB', '-')} | {r['losses'][:3]} |")
    for k in ("grad_check", "loss_check"):
        if k in RESULTS:
            print(k, json.dumps(RESULTS[k]))


if __name__ == "__main__":
    main()
