"""Latency of `falcon-qlora serve`: time to first token and decode tokens/s, seen by a streaming client.

    python bench/serve_latency.py --adapter demo-run/final --out bench/raw/serve_cpu_demo.json      # CPU, demo
    python bench/serve_latency.py --gpu-7b --out $OUT/serve_gpu_7b.json                              # GPU, < 3 min

The server is the real one (serve.build_app + uvicorn in a thread); the client is plain http.client reading the
server-sent events, so the numbers include HTTP, the chat template, tokenization and the stop-string streamer.
Each request is timed from sending it to its first content delta (TTFT) and from there to the last delta
(decode tokens/s = (completion tokens - 1) / that time). Both model ids are measured: base + adapter, and the base
with the adapter switched off.
--gpu-7b: a random-init Falcon-7B (shapes of tiiuae/falcon-7b, bench/speed.py's builder, written once to --model-dir)
in 4-bit NF4 with a fresh LoRA of the reference recipe (r 64 on Falcon's 4 linears), prompts of --prompt-tokens
random words, and every answer forced to --max-tokens tokens (min_new_tokens), so tokens/s is a steady-state figure.
The GPU machine needs the serve wheels besides the usual ones:
    ../shared/device/wheels.sh fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 anyio==4.16.0 \\
        click==8.5.1 annotated-doc==0.0.7 opentelemetry-api==1.45.2 sniffio==1.3.1 idna==3.20
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def stream_once(host: str, port: int, model: str, content: str, max_tokens: int) -> dict:
    """One streamed chat completion: seconds to the first content delta, total seconds, deltas and tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first = last = None
    text, usage = "", None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        msg = json.loads(line[6:])
        if msg.get("usage"):
            usage = msg["usage"]
        delta = msg["choices"][0]["delta"].get("content") if msg.get("choices") else None
        if delta:
            last = time.perf_counter()
            first = first or last
            text += delta
    conn.close()
    n = usage["completion_tokens"]
    return {"ttft_s": first - start, "total_s": time.perf_counter() - start, "completion_tokens": n,
            "prompt_tokens": usage["prompt_tokens"], "decode_tok_s": (n - 1) / (last - first) if last > first else None,
            "text": text}


def summarize(runs: list[dict]) -> dict:
    speeds = [r["decode_tok_s"] for r in runs if r["decode_tok_s"]]
    return {"requests": len(runs), "ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
            "ttft_s_max": max(r["ttft_s"] for r in runs),
            "decode_tok_s_median": statistics.median(speeds) if speeds else None,
            "completion_tokens_mean": statistics.mean(r["completion_tokens"] for r in runs),
            "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in runs)}


def load_7b(model_dir: Path):
    """The random Falcon-7B in 4-bit with a reference-recipe LoRA whose B is random too (so the adapter changes the
    answer, like a trained one)."""
    import torch
    from falcon_qlora.config import load_config
    from falcon_qlora.model import attach_lora, load_base_model, load_tokenizer
    if not (model_dir / "config.json").is_file():
        from speed import build_falcon7b
        build_falcon7b(model_dir)
    cfg = load_config(None, model_name_or_path=str(model_dir), compute_dtype="bf16")
    model = attach_lora(load_base_model(cfg), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    return model, load_tokenizer(str(model_dir), cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="adapter folder (CPU demo: demo-run/final)")
    ap.add_argument("--gpu-7b", action="store_true", help="random Falcon-7B on the GPU instead of --adapter")
    ap.add_argument("--model-dir", default="/tmp/falcon7b-random")
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--requests", type=int, default=8, help="requests per model id (after one warm-up)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256, help="--gpu-7b: prompt length in words")
    a = ap.parse_args()
    import torch
    from falcon_qlora.serve import build_app, start_in_thread
    t0 = time.time()
    gen_kwargs = {}
    if a.gpu_7b:
        model, tok = load_7b(Path(a.model_dir))
        rng = random.Random(0)
        prompts = [" ".join(f"w{rng.randrange(65000)}" for _ in range(a.prompt_tokens)) for _ in range(a.requests)]
        gen_kwargs = {"min_new_tokens": a.max_tokens}
    else:
        from falcon_qlora.chat import load_chat_model
        from falcon_qlora.demo import heldout_pairs
        model, tok = load_chat_model(a.adapter)
        prompts = [p.removeprefix("### Human: ").removesuffix(" ### Assistant:")
                   for p, _ in heldout_pairs()[:a.requests]]
    load_s = time.time() - t0
    app = build_app(model, tok, "bench", max_tokens_cap=max(a.max_tokens, 64), generate_kwargs=gen_kwargs)
    server, url = start_in_thread(app)
    host, port = url.removeprefix("http://").split(":")
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or
               platform.machine(), "torch_threads": torch.get_num_threads(), "load_s": round(load_s, 1),
               "model": "random Falcon-7B, 4-bit NF4 + LoRA r64" if a.gpu_7b else str(a.adapter), "ids": {}}
    for model_id in ("bench", "bench:base"):
        stream_once(host, int(port), model_id, prompts[0], a.max_tokens)                      # warm-up
        runs = [stream_once(host, int(port), model_id, p, a.max_tokens) for p in prompts]
        results["ids"][model_id] = {**summarize(runs), "first_answer": runs[0]["text"][:200]}
        print(model_id, json.dumps(results["ids"][model_id]), flush=True)
    server.should_exit = True
    if torch.cuda.is_available():
        results["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results["seconds"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "ids"}))


if __name__ == "__main__":
    main()
