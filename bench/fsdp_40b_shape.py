"""FSDP-QLoRA at Falcon-40B's shape with world size 1: does falcon-qlora's FSDP path run, and what memory does it take.

The model has Falcon-40B's width (hidden 8192, 128 query heads, 8 kv heads, new_decoder_architecture, ffn 32768,
vocab 65024) but only --layers decoder layers, with random weights (nothing from the hub). It is loaded in 4-bit by
falcon_qlora.model (4-bit storage in the compute dtype, as FSDP needs), gets LoRA, and is trained for a few steps by
falcon_qlora.train.build_trainer under the shipped accelerate config (one FalconDecoderLayer per FSDP unit). GPU memory
is recorded after loading, per step and at the peak; the per-layer figures give the 60-layer model by extrapolation.
A checkpoint (sharded state dict) and the gathered final adapter are saved last.

    accelerate launch --config_file src/falcon_qlora/accelerate_configs/fsdp_qlora.yaml --num_processes 1 \
        bench/fsdp_40b_shape.py --out $OUT/fsdp.json
    python bench/fsdp_40b_shape.py --out $OUT/fsdp.json          # re-launches itself exactly as above
    python bench/fsdp_40b_shape.py --tiny --no-fsdp --out x.json  # CPU check of the script (accelerate has no CPU FSDP)

The JSON is rewritten after every phase, so a failure late in the run still leaves the figures measured before it
(with "ok": false and the error). Needs on the GPU machine, besides its image: bitsandbytes, trl, datasets (+ dill,
multiprocess), pydantic (+ pydantic-core, annotated-types, typing-inspection) as wheels (../shared/device/wheels.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 2 ** 30
FALCON_40B = dict(vocab_size=65024, hidden_size=8192, num_attention_heads=128, num_kv_heads=8, ffn_hidden_size=32768,
                  full_layers=60)
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=256,
            full_layers=60)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (Falcon-40B has 60)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--optim", default="adamw_torch", help="optimizer (the reference's paged_adamw_32bit also works "
                   "outside FSDP)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="turn off gradient checkpointing (reference: on)")
    p.add_argument("--workdir", default="/tmp/falcon40b-shape", help="random model, tokenizer and run folder")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU smoke test)")
    p.add_argument("--no-fsdp", action="store_true", help="plain single process (no accelerate launch)")
    a = p.parse_args(argv)
    if a.tiny:
        a.seq, a.batch, a.steps, a.lora_r = min(a.seq, 32), min(a.batch, 2), min(a.steps, 2), min(a.lora_r, 8)
    return a


def relaunch_under_accelerate(argv) -> None:
    """Plain `python bench/fsdp_40b_shape.py` re-runs itself under accelerate with the shipped FSDP config."""
    from falcon_qlora.distributed import config_path
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("fsdp_qlora")),
           "--num_processes", "1", __file__, *argv]
    print("re-launching:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)


def build_model(folder: Path, shape: dict, layers: int, cuda: bool) -> dict:
    """Random bf16 Falcon of the given shape + a word-level tokenizer (one token per word), saved as safetensors."""
    import torch
    from common import save_word_tokenizer
    from transformers import FalconConfig, FalconForCausalLM
    vocab = shape["vocab_size"]
    cfg = FalconConfig(vocab_size=vocab, hidden_size=shape["hidden_size"], num_hidden_layers=layers,
                       num_attention_heads=shape["num_attention_heads"], num_kv_heads=shape["num_kv_heads"],
                       ffn_hidden_size=shape["ffn_hidden_size"], new_decoder_architecture=True, parallel_attn=True,
                       bias=False, alibi=False, bos_token_id=vocab - 8, eos_token_id=vocab - 8)
    marker = folder / "shape.json"
    want = {"config": cfg.to_dict(), "layers": layers}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return {"built": False}
    folder.mkdir(parents=True, exist_ok=True)
    save_word_tokenizer(folder, vocab)
    t = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = FalconForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if cuda:
        torch.cuda.empty_cache()
    marker.write_text(json.dumps(want))
    return {"built": True, "params": n, "build_s": round(time.time() - t, 1)}


def rows(n: int, vocab: int, seq: int):
    """Guanaco-style rows of at least `seq` words, so every row fills max_length."""
    import random
    from datasets import Dataset
    r = random.Random(0)
    out = []
    for _ in range(n):
        h = " ".join(f"w{r.randrange(vocab - 8)}" for _ in range(seq // 4))
        a = " ".join(f"w{r.randrange(vocab - 8)}" for _ in range(seq))
        out.append({"text": f"### Human: {h} ### Assistant: {a}"})
    return Dataset.from_list(out)


def module_bytes(module) -> int:
    """Bytes a module holds on its device: parameters, buffers and bitsandbytes' quantization state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and hasattr(t, "untyped_storage") and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            add(qs.absmax)
            add(qs.code)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    return total


def gib(x):
    return None if x is None else round(x / GIB, 3)


def mem():
    import torch
    if not torch.cuda.is_available():
        import resource
        return {"cpu_max_rss_gib": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    return {"allocated_gib": gib(torch.cuda.memory_allocated()), "peak_gib": gib(torch.cuda.max_memory_allocated()),
            "reserved_gib": gib(torch.cuda.memory_reserved())}


def fsdp_summary(wrapped) -> dict:
    """FSDP units and the dtypes of their flat parameters: each unit must hold one dtype and one requires_grad."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return {}
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    kinds = {}
    for u in units:
        for p in u.parameters(recurse=False):
            key = f"{p.dtype}/{'trainable' if p.requires_grad else 'frozen'}"
            kinds[key] = kinds.get(key, 0) + 1
    inner = [type(u.module).__name__ for u in units]
    return {"units": len(units), "FalconDecoderLayer_units": inner.count("FalconDecoderLayer"),
            "lora_units": sum(n == "Linear" for n in inner), "flat_params_by_dtype": kinds}


def run(a, result: dict, write) -> None:
    import torch
    from transformers import TrainerCallback
    from falcon_qlora import distributed as dist
    from falcon_qlora.config import make_config
    from falcon_qlora.model import attach_lora, load_base_model, load_tokenizer, resolve_compute_dtype
    from falcon_qlora.train import build_trainer
    cuda = torch.cuda.is_available()
    shape = TINY if a.tiny else FALCON_40B
    folder = Path(a.workdir) / ("tiny" if a.tiny else "model")
    result["build"] = build_model(folder, shape, a.layers, cuda)
    cfg = make_config(model_name_or_path=str(folder), output_dir=str(Path(a.workdir) / "run"), max_length=a.seq,
                      per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=a.steps,
                      save_steps=10 * a.steps, save_total_limit=1, logging_steps=1, lora_r=a.lora_r, lora_alpha=16,
                      optim=a.optim, warmup_ratio=0.0, gradient_checkpointing=not a.no_grad_ckpt, eval_split=None,
                      disable_tqdm=True, report_to="none", overwrite=True)
    dtype = resolve_compute_dtype(cfg)
    dist.init()
    dist.check_fsdp(dtype)
    result["config"] = {"compute_dtype": str(dtype), "fsdp": dist.fsdp_enabled(), "world_size": dist.world_size(),
                        "layers": a.layers, "seq": a.seq, "batch": a.batch, "lora_r": a.lora_r, "optim": a.optim,
                        "gradient_checkpointing": cfg.gradient_checkpointing, **{k: shape[k] for k in shape}}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        result["gpu"] = torch.cuda.get_device_name()
    t = time.time()
    tok = load_tokenizer(str(folder), cfg)
    model = load_base_model(cfg)
    storage = {str(m.weight.dtype) for m in model.modules() if type(m).__name__ == "Linear4bit"}
    layer = model.transformer.h[0]
    layer_b = module_bytes(layer)
    rest_b = module_bytes(model) - a.layers * layer_b  # embeddings (tied lm_head) and the final norm
    result["load"] = {"s": round(time.time() - t, 1), "quant_storage": sorted(storage), **mem(),
                      "per_layer_4bit_gib": gib(layer_b), "embeddings_and_norm_gib": gib(rest_b),
                      "per_layer_4bit_bytes": layer_b, "embeddings_and_norm_bytes": rest_b}
    model = attach_lora(model, cfg)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["lora_params"] = lora
    write()

    steps = []

    class Memory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            steps.append({"step": state.global_step, "s": round(time.time() - self.t, 3), **mem()})
            result["steps"] = steps
            write()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(cfg, model, tok, rows(max(64, a.batch * a.steps), shape["vocab_size"], a.seq), None,
                            callbacks=[Memory()])
    out = trainer.train()
    result["train"] = {"loss": round(out.training_loss, 4), "train_peak": mem(),
                       "fsdp": fsdp_summary(trainer.model_wrapped)}
    timed = [s["s"] for s in steps[1:]] or [s["s"] for s in steps]
    result["train"]["tokens_per_s"] = round(a.batch * a.seq * dist.world_size() / (sum(timed) / len(timed)), 1)
    result["estimate_60_layers"] = extrapolate(result, shape, a, lora // a.layers, layer_b, rest_b)
    write()
    # Saving comes after the figures, each part on its own, so that a failure here still leaves them.
    try:  # a resumable checkpoint, as at a save_steps boundary (sharded state dict under FSDP)
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        files = sorted(p.name for p in (Path(cfg.output_dir) / f"checkpoint-{a.steps}").iterdir())
        result["checkpoint"] = {"ok": True, "files": files}
    except Exception as err:
        result["checkpoint"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:1000]}
    write()
    final = Path(cfg.output_dir) / "final"
    dist.save_adapter(trainer, final)  # the gathered adapter, as train() saves it
    from safetensors import safe_open
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        result["final_adapter_tensors"] = len(list(f.keys()))
        result["final_adapter_nonzero_lora_B"] = sum(int(f.get_tensor(k).abs().max() > 0) for k in f.keys()
                                                     if "lora_B" in k)
    result["expected_adapter_tensors"] = 2 * len(cfg.lora_target_modules) * a.layers


def extrapolate(result, shape, a, lora_per_layer, layer_b, rest_b) -> dict:
    """The full model from the measured one: weights grow by one 4-bit layer per layer; training adds per layer the
    LoRA weights, grads and Adam states (fp32: 16 bytes per parameter) and one checkpointed activation."""
    full = shape["full_layers"]
    weights = rest_b + full * layer_b
    peak = result["train"]["train_peak"].get("peak_gib")
    act = a.batch * a.seq * shape["hidden_size"] * 2 if not a.no_grad_ckpt else None
    per_layer_train = layer_b + 16 * lora_per_layer + (act or 0)
    out = {"layers": full, "weights_4bit_gib": gib(weights),
           "weights_per_gpu_gib": {n: gib(weights / n) for n in (1, 2, 4, 8)}}
    if peak is not None:
        out["train_peak_world_size_1_gib"] = round(peak + (full - a.layers) * per_layer_train / GIB, 2)
        out["note"] = ("train peak = measured peak + per extra layer (4-bit weights + 16 B per LoRA parameter + one "
                       "checkpointed bf16 activation); FSDP over N GPUs divides the weight and LoRA parts by N")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    from falcon_qlora.distributed import fsdp_enabled
    if not a.no_fsdp and not fsdp_enabled():
        relaunch_under_accelerate(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"ok": False, "argv": argv}

    def write():
        if int(os.environ.get("RANK", 0)) == 0:
            out.write_text(json.dumps(result, indent=2) + "\n")

    t = time.time()
    try:
        run(a, result, write)
        result["ok"] = True
    except BaseException as err:
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        result["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        result["wall_s"] = round(time.time() - t, 1)
        write()
        print(json.dumps({k: result.get(k) for k in ("ok", "load", "train", "estimate_60_layers", "error")}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
