"""What is live on the GPU at the training peak of the demo preset, per profile (to check `estimate` against).

    python3 bench/demo_memory.py --out demo_memory.json [--steps 3] [--profiles speed] [--model FOLDER]

Records torch's CUDA allocator history while `measure.training_peak` trains, replays it to the moment of
the largest allocated total after training started, and groups the blocks live then by where they were allocated
(the innermost frame outside torch's own modules, plus the innermost torch.nn / torch.utils frame).
"""
import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def where(frames) -> str:
    own = next((f for f in frames if "/torch/" not in f["filename"] and not f["filename"].startswith("<")), None)
    nn = next((f for f in frames if "/torch/nn/" in f["filename"] or "/torch/utils/" in f["filename"]
               or "/torch/autograd/" in f["filename"]), None)
    fmt = lambda f: f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}" if f else "-"  # noqa: E731
    return f"{fmt(own)} | {fmt(nn)}"


def live_at_peak(trace):
    """(largest allocated total in the trace, the blocks allocated at that moment)."""
    live, cur, peak, peak_i = {}, 0, -1, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > peak:
                peak, peak_i = cur, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])
    blocks = {}
    for e in trace[:peak_i + 1]:
        if e["action"] == "alloc":
            blocks[e["addr"]] = e
        elif e["action"] == "free_completed":
            blocks.pop(e["addr"], None)
    return peak, list(blocks.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profiles", default="reference,speed,memory",
                    help="comma-separated; one per process gives each run a fresh allocator (no earlier run's blocks)")
    ap.add_argument("--model", default=None, help="a folder with SmolLM2's config and tokenizer but no weights: "
                    "random weights of the same shapes are written to a copy (memory does not depend on them)")
    args = ap.parse_args()
    import torch
    from falcon_qlora.config import load_config
    from falcon_qlora.embedded import smollm2_path
    from falcon_qlora.measure import training_peak
    model = None
    if args.model:
        import shutil
        from transformers import AutoConfig, AutoModelForCausalLM
        model = "/tmp/smollm2-random"
        shutil.copytree(args.model, model, dirs_exist_ok=True)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch.bfloat16).save_pretrained(model)
    else:
        smollm2_path()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps, "profiles": {}}
    for profile in args.profiles.split(","):
        cfg = load_config("demo", output_dir=f"/tmp/demo-mem-{profile}", overwrite=True, profile=profile,
                          max_steps=args.steps, **({"model_name_or_path": model} if model else {}))
        import gc
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        peak = training_peak(cfg)
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snap["device_traces"][torch.cuda.current_device()]
        # the model is loaded inside the trace too; the largest total is in training (it matches the peak above)
        replay_peak, blocks = live_at_peak(trace)
        groups = defaultdict(lambda: [0, 0])
        for b in blocks:
            g = groups[where(b.get("frames", []))]
            g[0] += b["size"]
            g[1] += 1
        top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:40]
        out["profiles"][profile] = {
            "max_memory_allocated_gib": round(peak / 2**30, 4), "replayed_peak_gib": round(replay_peak / 2**30, 4),
            "trace_events": len(trace), "live_blocks": len(blocks),
            "groups_mib": [[round(s / 2**20, 2), n, k] for k, (s, n) in top]}
        print(profile, json.dumps(out["profiles"][profile], indent=1), flush=True)
        del snap, trace, blocks
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
