"""`falcon-qlora estimate` against the peaks measured on the H200 (committed raw JSON), no GPU needed.

    python bench/estimate_vs_measured.py          # prints the Markdown table quoted in the README

The estimate models the reference code path (padded rows of max_length); the profiles change memory on purpose, so
only runs of the reference path are compared, plus the demo preset as it ran (profile auto -> speed, padding-free).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
RAW = Path(__file__).parent / "raw"


def main() -> None:
    from falcon_qlora.config import load_config
    from falcon_qlora.estimate import estimate
    ref = json.loads((RAW / "h200_run3.json").read_text())["variants"]["reference"]
    demo = json.loads((RAW / "h200_demo.json").read_text())
    rows = [
        ("Falcon-7B reference recipe (4 x 4, checkpointing), random weights", load_config("reference"),
         ref["peak_alloc_GiB"], "h200_run3.json: variants.reference"),
        ("demo preset, SmolLM2-135M (ran with profile auto -> speed)", load_config("demo"),
         demo["peak_allocated_gib"], "h200_demo.json"),
    ]
    print("| run | estimate (GiB) | measured peak allocated (GiB) | estimate / measured | source |")
    print("|---|---|---|---|---|")
    for name, cfg, measured, src in rows:
        est = estimate(cfg, device="cuda")["peak_bytes"] / 2**30
        print(f"| {name} | {est:.2f} | {measured:.2f} | {est / measured:.3f} | {src} |")


if __name__ == "__main__":
    main()
