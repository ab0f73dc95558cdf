"""merge and chat at Falcon-7B shape on a GPU, through the CLI a user runs (bench/RESULTS.md, "merge and chat at 7B").

    python bench/gpu_merge_chat.py --out results.json [--model-dir /tmp/falcon7b-random] [--budget-s 520]

Builds (or reuses) bench/speed.py's random-weight Falcon-7B with its word-level tokenizer, trains an adapter for 30
steps with `falcon-qlora train`, then: `merge` in the default dtype (bf16 here) and in fp32, each with the relative
logit error its fp32 check measured; the same merge with the adapter doubled, which must be refused; and `chat`
with a word-level prompt, which must answer without a traceback. Each step's result is written to --out as soon as
it is known, so a step cut off by the budget leaves the others.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", default="/tmp/falcon7b-random")
    ap.add_argument("--work", default="/tmp/merge-chat")
    ap.add_argument("--budget-s", type=float, default=520)
    a = ap.parse_args()
    t0, result, out = time.time(), {"steps": {}}, Path(a.out)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    def record(name, **values):
        result["steps"][name] = values
        out.write_text(json.dumps(result, indent=2))
        print(name, json.dumps(values)[:600], flush=True)

    def cli(name, *args, timeout=300):
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "falcon_qlora.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "warn" not in ln.lower() and "%|" not in ln and ln.strip()]
        record(name, rc=proc.returncode, seconds=round(time.time() - start, 1), tail=lines[-6:])
        return proc

    import torch
    result["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if not (Path(a.model_dir) / "config.json").is_file():
        import speed
        start = time.time()
        speed.build_falcon7b(Path(a.model_dir))
        record("build", seconds=round(time.time() - start, 1))
    data = work / "data"
    data.mkdir(exist_ok=True)
    rng = random.Random(0)
    for split, n in (("train", 480), ("test", 16)):
        rows = []
        for _ in range(n):
            q = " ".join(f"w{rng.randrange(2000)}" for _ in range(rng.randrange(8, 40)))
            rows.append({"text": f"### Human: {q} ### Assistant: " + " ".join(reversed(q.split()))})
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = work / "run"
    cli("train", "train", "--model_name_or_path", a.model_dir, "--dataset_name", str(data), "--output_dir", str(run),
        "--max_steps", "30", "--save_steps", "1000", "--logging_steps", "10", "--max_length", "128",
        "--eval_split", "None", "--overwrite", "true", "--disable_tqdm", "true", timeout=400)
    final = run / "final"
    steps = [("merge_default", []), ("chat", None), ("merge_fp32", ["--dtype", "fp32"]), ("merge_doubled", "x2")]
    for name, extra in steps:
        if time.time() - t0 > a.budget_s:
            record(name, skipped=f"over the {a.budget_s:.0f} s budget")
            continue
        if name == "chat":
            proc = cli("chat", "chat", "--adapter", str(final), "--prompt", "w1 w2 w3", "--max_new_tokens", "16")
            result["steps"]["chat"]["traceback"] = "Traceback" in proc.stderr
            out.write_text(json.dumps(result, indent=2))
            continue
        target = work / name
        shutil.rmtree(target, ignore_errors=True)
        if extra == "x2":
            start = time.time()
            code = ("import sys, torch, falcon_qlora.merge as M\n"
                    "from peft import PeftModel\n"
                    "def doubled(base, adapter):\n"
                    "    base.dequantize(dtype=torch.float32)\n"
                    "    m = PeftModel.from_pretrained(base, str(adapter))\n"
                    "    [p.data.mul_(2) for n, p in m.named_parameters() if 'lora_B' in n]\n"
                    "    return m.merge_and_unload().float().eval()\n"
                    "M.merged_model = doubled\n"
                    "from falcon_qlora.errors import UserError\n"
                    "try:\n"
                    f"    M.merge({str(final)!r}, {str(target)!r})\n"
                    "    print('NOT REFUSED'); sys.exit(1)\n"
                    "except UserError as e:\n"
                    "    print('refused:', e)\n")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "warn" not in ln.lower() and "%|" not in ln and ln.strip()]
            record(name, rc=proc.returncode, seconds=round(time.time() - start, 1), tail=lines[-3:],
                   refused=any(ln.startswith("refused:") for ln in lines), written=target.exists())
            continue
        cli(name, "merge", "--adapter", str(final), "--out", str(target), *extra)
        marker = target / "falcon_qlora_merge.json"
        if marker.is_file():
            result["steps"][name]["marker"] = json.loads(marker.read_text())
            out.write_text(json.dumps(result, indent=2))
        shutil.rmtree(target, ignore_errors=True)  # 14-28 GB each: the disk holds one at a time
    result["seconds"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
