"""The real consumer: llama.cpp loads the exported demo adapter and answers the demo's 40 held-out prompts.

    falcon-qlora demo                                            # writes demo-run/final (a few minutes on a CPU)
    pip install "falcon-qlora[gguf]"                             # llama-cpp-python (compiles llama.cpp)
    python bench/gguf_demo_llamacpp.py --adapter demo-run/final --json bench/raw/gguf_demo_llamacpp.json

For q8_0 (gguf package) and q4_k_m (llama.cpp's quantizer): export, then greedy decoding by llama.cpp itself from
each prompt exactly as the demo builds it ("### Human: ... ### Assistant:", tokenized by llama.cpp from the GGUF's
vocabulary), at most the demo's 48 new tokens. Scored like the demo: the answer must parse as the expected JSON card,
and generation must end at an end-of-generation token (EOS), not at the token limit. Writes versions, command,
timings and every answer.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapter", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--quants", default="q8_0,q4_k_m")
    a = p.parse_args()
    import gguf
    import transformers
    from falcon_qlora import llamacpp
    from falcon_qlora.config import load_config
    from falcon_qlora.demo import MAX_NEW_TOKENS, _same_card, heldout_pairs
    from falcon_qlora.export import export
    cfg = load_config("demo")
    prompts, expected = zip(*heldout_pairs(cfg))
    record = {"command": " ".join(sys.argv), "python": platform.python_version(), "machine": platform.machine(),
              "versions": {"llama.cpp": llamacpp.version(), "gguf": gguf.__version__ if hasattr(gguf, "__version__")
                           else "?", "transformers": transformers.__version__}, "adapter": a.adapter, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in a.quants.split(","):
            start = time.time()
            out = export(a.adapter, Path(tmp) / f"demo-{quant}.gguf", quant=quant)
            exported = time.time() - start
            answers = llamacpp.greedy(out, list(prompts), MAX_NEW_TOKENS)
            rows = [{"prompt": pr, "expected": ex, "answer": ans.strip(), "ended_at_eos": eos,
                     "correct": _same_card(ans.strip(), ex)} for pr, ex, (ans, eos) in zip(prompts, expected, answers)]
            record["results"][quant] = {
                "file_bytes": out.stat().st_size, "export_seconds": round(exported, 1),
                "decode_seconds": round(time.time() - start - exported, 1),
                "correct": sum(r["correct"] for r in rows), "ended_at_eos": sum(r["ended_at_eos"] for r in rows),
                "rows": len(rows), "answers": rows}
            r = record["results"][quant]
            print(f"{quant}: {r['correct']}/{r['rows']} correct cards, {r['ended_at_eos']}/{r['rows']} stopped at EOS, "
                  f"{r['file_bytes'] / 2**20:.0f} MiB", flush=True)
    Path(a.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
