"""GGUF export of a Falcon-7B-shaped model: time, peak host memory and file size per quant type.

    python bench/export_7b.py --json results/export_7b.json            # GPU box (16 cores): ~4 min, ~35 GB disk
    python bench/export_7b.py --json /tmp/e.json --tiny                # the same flow on a tiny Falcon (smoke test)

Builds a random-weight Falcon-7B (the real shapes: 32 layers, 4544 wide, 71 query heads, one KV head, vocabulary
65024) saved in bf16 with a small byte-level BPE tokenizer (export writes BPE tokenizers only; the unused ids become
padding tokens, so every tensor keeps its real size), then runs `falcon_qlora.export.export(model=...)` once per
quant type, each in a fresh process so that its peak resident memory (ru_maxrss) is its own. The file is deleted after
it is measured; the JSON is rewritten after each quant type, and says "complete" at the end. k-quants run only where
llama-cpp-python is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))   # tests/tiny.py: the byte-level BPE tokenizer builder
QUANTS = ["f16", "bf16", "q8_0", "q4_k_m"]


def build(path: Path, tiny: bool) -> None:
    import torch
    from tiny import build_tokenizer
    from transformers import FalconConfig, FalconForCausalLM
    tok = build_tokenizer(path)
    shape = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4) if tiny else \
        dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71)
    cfg = FalconConfig(multi_query=True, parallel_attn=True, bias=False, alibi=False, new_decoder_architecture=False,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # random init of 7B on a CPU takes minutes
        model = FalconForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, safe_serialization=True)


def one(model: Path, quant: str, out_dir: Path) -> dict:
    """Runs in its own process: one export, its wall time, peak RSS and file size."""
    from falcon_qlora.export import estimate_bytes, export
    from transformers import AutoConfig
    out = out_dir / f"model-{quant}.gguf"
    start = time.time()
    export(model=model, out=out, quant=quant, force=True)
    seconds = time.time() - start
    size = out.stat().st_size
    estimate = estimate_bytes(AutoConfig.from_pretrained(model), quant)[0]
    out.unlink()
    out.with_suffix(".Modelfile").unlink()
    return {"quant": quant, "seconds": round(seconds, 1), "file_bytes": size, "estimated_bytes": estimate,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--quants", default=",".join(QUANTS), help=f"comma-separated (default: {','.join(QUANTS)})")
    p.add_argument("--work-dir", default=None, help="where the model and files are written (default: the system temp)")
    p.add_argument("--one", nargs=3, metavar=("MODEL", "QUANT", "OUT_DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        Path(a.json).write_text(json.dumps(one(Path(a.one[0]), a.one[1], Path(a.one[2]))))
        return
    from falcon_qlora import llamacpp
    import torch
    results = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "tiny": a.tiny, "runs": []}
    import gguf
    results["gguf"] = getattr(gguf, "__version__", None) or _dist_version("gguf")
    with tempfile.TemporaryDirectory(dir=a.work_dir) as tmp:   # ~14 GB model + one file at a time
        tmp = Path(tmp)
        start = time.time()
        build(tmp / "model", a.tiny)
        results["build_seconds"] = round(time.time() - start, 1)
        for quant in a.quants.split(","):
            if quant == "q4_k_m" and not llamacpp.available():
                results["runs"].append({"quant": quant, "skipped": "llama-cpp-python is not installed"})
                continue
            rec = tmp / f"{quant}.json"
            subprocess.run([sys.executable, __file__, "--json", str(rec), "--one", str(tmp / "model"), quant,
                            str(tmp)], check=True)
            results["runs"].append(json.loads(rec.read_text()))
            print(results["runs"][-1], flush=True)
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")   # kept if a later quant is cut off
    results["complete"] = True
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {a.json}")


if __name__ == "__main__":
    main()
