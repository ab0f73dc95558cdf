"""Start-up of `falcon-qlora train` for the Falcon-7B shape: from the command to the first optimizer step, and where
that time goes (data, model load and 4-bit quantization, LoRA, trainer, first step), from a cProfile of the run.

    python3 bench/startup_7b.py --model-dir /tmp/falcon7b-random --json out.json   # after bench/speed.py built it

The model folder is bench/speed.py's random Falcon-7B (bf16 safetensors, word-level tokenizer); the data are 480
Guanaco-style rows of its words in a local JSONL file. The run is the reference recipe's config (profile auto) with
2 steps, no evaluation and no checkpoint.
"""
from __future__ import annotations

import argparse
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# cumulative time of these functions in the profile: the stages of falcon_qlora.train.train
STAGES = {"data (load, split, template)": "data.load_dataset_splits",
          "model load + 4-bit quantization": "model.load_base_model",
          "LoRA": "model.attach_lora",
          "trainer (SFTTrainer: tokenize, collator)": "train.build_trainer",
          "training (2 steps)": "trainer.train",
          "falcon_qlora.train.train in all": "train.train"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/falcon7b-random")
    ap.add_argument("--json", required=True)
    ap.add_argument("--work-dir", default="/tmp/startup")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import full_rows
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in full_rows(480)), encoding="utf-8")
    prof, out = work / "train.prof", work / "run"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "falcon_qlora.cli", "train",
           "--model_name_or_path", a.model_dir, "--dataset_name", str(data), "--output_dir", str(out),
           "--max_steps", "2", "--save_steps", "1000", "--logging_steps", "1", "--eval_split", "None",
           "--disable_tqdm", "True"]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t
    res = {"command": " ".join(cmd[5:]), "returncode": proc.returncode, "wall_s": round(wall, 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stdout_tail": proc.stdout[-1500:],
           "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        res["seconds_to_first_step"] = next((r["seconds_to_first_step"] for r in rows
                                             if "seconds_to_first_step" in r), None)
        res["plan"] = rows[0] if rows else None
    if prof.is_file():
        st = pstats.Stats(str(prof))
        cum = {}
        for (file, _, name), (_, _, _, ct, _) in st.stats.items():
            if "falcon_qlora" in file or (name == "train" and file.endswith("trainer.py")):
                key = f"{Path(file).stem}.{name}"
                cum[key] = max(cum.get(key, 0), ct)
        res["stages_s"] = {stage: round(cum[key], 1) for stage, key in STAGES.items() if key in cum}
        top = sorted(((ct, f"{Path(f).name}:{n}") for (f, _, n), (_, _, _, ct, _) in st.stats.items()), reverse=True)
        res["top_cumulative_s"] = [[round(ct, 1), name] for ct, name in top[:40]]
    Path(a.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("top_cumulative_s", "stdout_tail")}, indent=1))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
