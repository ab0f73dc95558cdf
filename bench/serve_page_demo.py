"""The chat page on the demo adapter, in a real browser: `falcon-qlora serve --adapter demo-run/final`, then
Debian's chromium (driven by playwright) asks held-out demo prompts side by side, base vs fine-tuned.

    falcon-qlora demo                                    # once: writes demo-run/final (~4 min on 2 cores)
    python bench/serve_page_demo.py --adapter demo-run/final --shot docs/serve.png --out bench/raw/serve_page_demo.json

First, through the OpenAI API of the same server, the base (adapter off) and the fine-tuned model answer --prompts
held-out prompts; an answer is right when it parses to the expected contact card. Then the page gets the first
prompt the base gets wrong and the adapter gets right: the script types it, checks that the adapter's card is seen
while it streams (a proper prefix of the final text), that both columns finish, and that the page shows exactly the
API's answers; the screenshot is taken then. Exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from falcon_qlora.demo import MAX_NEW_TOKENS as MAX_TOKENS  # noqa: E402  (the demo's own answer limit)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def right(answer: str, expected: str) -> bool:
    try:
        return json.loads(answer) == json.loads(expected)
    except ValueError:
        return False


def heldout(n: int) -> list[tuple[str, str]]:
    from falcon_qlora.demo import heldout_pairs
    return [(p.removeprefix("### Human: ").removesuffix(" ### Assistant:"), a) for p, a in heldout_pairs()[:n]]


def start_server(adapter: str) -> tuple[subprocess.Popen, str, list[str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "falcon_qlora.cli", "serve", "--adapter", adapter, "--port",
                             str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                return proc, url, [m["id"] for m in json.loads(r.read())["data"]]
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("falcon-qlora serve exited")
            time.sleep(1)
    raise SystemExit("falcon-qlora serve did not start")


def drive_page(url: str, prompt: str, shot: Path) -> dict:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 640})
        page.goto(url)
        page.check("#sbs")
        page.fill("#max_tokens", str(MAX_TOKENS))    # as the API calls: the base's long answers stop at the same point
        page.fill("#prompt", prompt)
        page.press("#prompt", "Enter")
        sel = ".column[data-model=adapter] .msg.assistant"
        page.wait_for_function(f"() => {{ const m = document.querySelector('{sel}'); return m && "
                               "m.dataset.state === 'streaming' && m.textContent.length > 8 }", timeout=600_000)
        partial = page.locator(sel).last.text_content()
        for col in ("base", "adapter"):
            page.wait_for_selector(f".column[data-model={col}] .msg.assistant[data-state=done]", timeout=600_000)
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        shown = {col: page.locator(f".column[data-model={col}] .msg.assistant").last.text_content()
                 for col in ("base", "adapter")}
        browser.close()
    return {"partial_while_streaming": partial, "shown": shown}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default="demo-run/final")
    ap.add_argument("--shot", default=str(ROOT / "docs" / "serve.png"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "raw" / "serve_page_demo.json"))
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts asked through the API first")
    a = ap.parse_args()
    proc, url, ids = start_server(a.adapter)
    try:
        adapter_id, base_id = ids
        table = []
        for prompt, expected in heldout(a.prompts):
            ask = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
            ans = {i: post(url, {"model": i, **ask})["choices"][0]["message"]["content"] for i in (base_id, adapter_id)}
            table.append({"prompt": prompt, "expected": expected, "base": ans[base_id], "adapter": ans[adapter_id],
                          "base_right": right(ans[base_id], expected),
                          "adapter_right": right(ans[adapter_id], expected)})
            print(json.dumps(table[-1]), flush=True)
        pick = next((r for r in table if r["adapter_right"] and not r["base_right"]), None)
        checks = {"some prompt: base wrong, adapter right": pick is not None}
        page = {}
        if pick:
            page = drive_page(url, pick["prompt"], Path(a.shot))
            shown = page["shown"]
            checks.update({
                "adapter card seen while streaming": 0 < len(page["partial_while_streaming"]) and
                pick["adapter"].startswith(page["partial_while_streaming"]) and
                len(page["partial_while_streaming"]) < len(pick["adapter"]),
                "page shows the API's adapter answer": shown["adapter"] == pick["adapter"] + "valid JSON",
                "page shows the API's base answer": shown["base"] in (pick["base"] + "not JSON",
                                                                      pick["base"] + "valid JSON"),
                "page's adapter card is the expected card": right(shown["adapter"].removesuffix("valid JSON"),
                                                                   pick["expected"])})
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"adapter": a.adapter, "models": ids, "heldout": table,
              "base_right": sum(r["base_right"] for r in table),
              "adapter_right": sum(r["adapter_right"] for r in table),
              "page_prompt": pick and pick["prompt"], "page": page, "checks": checks, "screenshot": a.shot}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(checks, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
