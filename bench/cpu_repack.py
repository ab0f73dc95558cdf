"""bitsandbytes' CPU repacking on a CPU with AVX512-BF16: how much faster the packed inference kernel is, and what it
costs in accuracy, for one SmolLM2-135M MLP layer (576 -> 1536, NF4) at the batch sizes chat and eval use.

    python bench/cpu_repack.py --out bench/raw/cpu_repack.json

falcon-qlora keeps the trainable layout everywhere (model.keep_trainable_layout): the packed kernel computes in bf16
whatever the compute dtype, so eval and chat would stop matching the numerics training uses, and the layout cannot
be trained or dequantized. This measures what that choice gives up.
"""
from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
    torch.manual_seed(0)
    rows = []
    for batch in (1, 8, 40):
        timings, outs = {}, {}
        for layout in ("trainable", "packed"):
            lin = bnb.nn.Linear4bit(1536, 576, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(torch.randn(576, 1536), requires_grad=False, quant_type="nf4")
            lin = lin.to("cpu")
            w = dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
            lin.support_avx512bf16_for_cpu = layout == "packed" and has_avx512bf16()
            lin.eval()
            x = torch.randn(batch, 1536)
            with torch.no_grad():
                lin(x)  # the first call repacks where it can
                start = time.perf_counter()
                for _ in range(200):
                    y = lin(x)
                timings[layout] = (time.perf_counter() - start) / 200 * 1e6
                outs[layout] = float((y - x @ w.t()).norm() / (x @ w.t()).norm())
        rows.append({"batch": batch, "trainable_us": round(timings["trainable"], 1),
                     "packed_us": round(timings["packed"], 1),
                     "speedup": round(timings["trainable"] / timings["packed"], 2),
                     "relative_error_trainable": outs["trainable"], "relative_error_packed": outs["packed"]})
        print(rows[-1], flush=True)
    result = {"cpu": platform.processor() or platform.machine(), "avx512_bf16": bool(has_avx512bf16()),
              "torch": torch.__version__, "bitsandbytes": bnb.__version__, "threads": torch.get_num_threads(),
              "layer": "Linear4bit 1536 -> 576, NF4, fp32 compute", "rows": rows}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
