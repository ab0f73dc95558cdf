"""serve: the OpenAI-compatible API, checked with the official openai client against a server on the tiny Falcon
(uvicorn in a thread of this process: no fork after torch is loaded)."""
from __future__ import annotations

import http.client
import os
import shutil
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi", reason="serve needs the serve extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="the API tests use the official openai client")

from falcon_qlora.chat import build_prompt, generate, load_chat_model  # noqa: E402
from falcon_qlora.cli import main  # noqa: E402
from falcon_qlora.serve import build_app, check_bind, start_in_thread  # noqa: E402
from falcon_qlora.serve_engine import render  # noqa: E402

QUESTION = "what is two plus three?"
ASK = [{"role": "user", "content": QUESTION}]
CAP, QUEUE = 48, 4


@contextmanager
def serving(chat_model, **kw):
    model, tok = chat_model
    app = build_app(model, tok, "tiny", max_tokens_cap=CAP, queue_size=QUEUE, **kw)
    server, url = start_in_thread(app)
    try:
        yield url, app.state.engine
    finally:
        server.should_exit = True


@pytest.fixture(scope="module")
def server(chat_model):
    with serving(chat_model) as (url, engine):
        yield url, engine


def client(url: str, key: str = "unused"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(url: str, **kw):
    return client(url).chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 16, **kw})


@contextmanager
def scripted(engine, tok, text: str, delay: float = 0.0, gate: threading.Event | None = None):
    """Make the real model write `text` token by token (then EOS) for the prompt ASK; each token waits `delay` s,
    and the first waits for `gate`: a busy or slow model whose output is known in advance."""
    n = len(tok(render(tok, ASK)[0], add_special_tokens=False)["input_ids"])
    script = tok(text, add_special_tokens=False)["input_ids"]

    def allowed(batch_id, ids):
        i = len(ids) - n
        if i == 0 and gate is not None:
            gate.wait(30)
        time.sleep(delay)
        return [script[i]] if i < len(script) else [tok.eos_token_id]
    engine.generate_kwargs = {"prefix_allowed_tokens_fn": allowed}
    try:
        yield script
    finally:
        engine.generate_kwargs = {}


def wait_idle(engine, timeout: float = 30) -> None:
    end = time.time() + timeout
    while not engine.idle() and time.time() < end:
        time.sleep(0.02)
    assert engine.idle()


def test_models_are_the_adapter_and_the_base_without_it(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny", "tiny:base"]


def test_answer_is_what_chat_answers_and_base_is_the_adapter_switched_off(server, chat_model):
    """Same Guanaco prompt and greedy decoding as `falcon-qlora chat`; ':base' is the same weights, adapter off."""
    url, _ = server
    model, tok = chat_model
    expected = generate(model, tok, [build_prompt([], QUESTION)], max_new_tokens=16)[0]
    with model.disable_adapter():
        expected_base = generate(model, tok, [build_prompt([], QUESTION)], max_new_tokens=16)[0]
    reply = ask(url)
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].message.role == "assistant"
    assert ask(url, model="tiny:base").choices[0].message.content == expected_base
    assert expected_base != expected
    assert ask(url).choices[0].message.content == expected      # the adapter is back on
    assert reply.usage.prompt_tokens == len(tok(build_prompt([], QUESTION), add_special_tokens=False).input_ids)
    assert 0 < reply.usage.completion_tokens <= 16


def test_stream_deltas_add_up_to_the_plain_answer(server):
    url, _ = server
    plain = ask(url).choices[0].message.content
    chunks = list(ask(url, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([d for d in deltas if d]) > 1 and "".join(deltas) == plain
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_stops_at_the_next_user_turn_and_at_stop_sequences(server, chat_model):
    """The template's next '### Human:' and the request's `stop` both end generation (not only cut the text), and no
    part of a stop string is ever streamed."""
    url, engine = server
    text = " two plus three is five. ### Human: what is one plus one? ### Assistant: two"
    with scripted(engine, chat_model[1], text) as script:
        reply = ask(url, max_tokens=40)
        assert reply.choices[0].message.content == "two plus three is five."
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < len(script)
        streamed = [c.choices[0].delta.content or "" for c in ask(url, max_tokens=40, stream=True) if c.choices]
        assert "".join(streamed) == "two plus three is five." and not any("#" in d for d in streamed)
        assert ask(url, max_tokens=40, stop=[" is"]).choices[0].message.content == "two plus three"


@pytest.mark.parametrize("body, code", [
    ({"messages": []}, "invalid_value"),
    ({"messages": ASK, "temperature": 0, "frequency_penalty": 0.5}, "unknown_field"),
    ({"messages": ASK, "max_tokens": CAP + 1}, "max_tokens_too_large"),
    ({"messages": [{"role": "user", "content": "one plus two " * 1200}]}, "context_length_exceeded"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "invalid_value"),
], ids=["empty-messages", "unknown-field", "max-tokens-over-cap", "prompt-over-context", "last-not-user"])
def test_bad_requests_get_400_and_a_json_error(server, body, code):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model="tiny", **body)
    assert err.value.status_code == 400 and err.value.body["code"] == code, err.value.body
    assert err.value.body["message"]


def test_bad_json_and_unknown_model(server):
    url, _ = server
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b'{"model": "tiny", "messages": [', headers={
        "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and json.loads(r.read())["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="tiny:base"):
        ask(url, model="gpt-4o")


def occupy(pool, url, engine):
    """Start one request and wait until the model works on it (held at the gate): -> its future."""
    first = pool.submit(ask, url)
    end = time.time() + 30
    while not engine.busy.is_set() and time.time() < end:
        time.sleep(0.01)
    return first


def test_full_queue_is_refused_with_429_and_then_drains(server, chat_model):
    """One request generating, QUEUE waiting: the next is refused at once; all accepted ones are answered."""
    url, engine = server
    gate = threading.Event()
    with scripted(engine, chat_model[1], " five.", gate=gate), ThreadPoolExecutor(QUEUE + 1) as pool:
        accepted = [occupy(pool, url, engine)] + [pool.submit(ask, url) for _ in range(QUEUE)]
        end = time.time() + 30
        while engine.jobs.qsize() < QUEUE and time.time() < end:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as err:
            ask(url)
        assert err.value.status_code == 429 and err.value.body["code"] == "queue_full"
        gate.set()
        assert [f.result().choices[0].message.content for f in accepted] == ["five."] * (QUEUE + 1)


def test_twenty_concurrent_clients_are_each_answered_or_refused(server, chat_model):
    """20 clients while the model is held busy: 1 + QUEUE answered, the rest refused with 429 at once, none lost,
    and the server answers afterwards."""
    url, engine = server
    gate = threading.Event()

    def one():
        try:
            return ask(url).choices[0].message.content
        except openai.RateLimitError as err:
            return err.status_code
    with scripted(engine, chat_model[1], " five.", gate=gate), ThreadPoolExecutor(20) as pool:
        futures = [occupy(pool, url, engine)] + [pool.submit(one) for _ in range(19)]
        end = time.time() + 30
        while sum(f.done() for f in futures) < 20 - 1 - QUEUE and time.time() < end:
            time.sleep(0.02)
        gate.set()
        results = [f.result() for f in futures]
    results[0] = results[0].choices[0].message.content
    assert sorted(results, key=str) == [429] * (20 - 1 - QUEUE) + ["five."] * (1 + QUEUE)
    wait_idle(engine)
    assert ask(url).choices[0].message.content


def test_client_that_disconnects_mid_stream_stops_its_generation(server, chat_model):
    url, engine = server
    with scripted(engine, chat_model[1], " one" * 200, delay=0.02):
        stream = ask(url, max_tokens=CAP, stream=True)
        first = [next(stream) for _ in range(3)]
        stream.close()
        assert first[2].choices[0].delta.content
        wait_idle(engine)
        tokens, reason = engine.finished[-1]
    assert reason == "cancelled" and tokens < CAP
    assert ask(url).choices[0].message.content      # the server goes on


def test_a_base_without_adapter_is_one_model(tiny_falcon_7b_arch):
    model, tok = load_chat_model(None, base=str(tiny_falcon_7b_arch))
    app = build_app(model, tok, "plain", max_tokens_cap=CAP)
    server, url = start_in_thread(app)
    try:
        [entry] = client(url).models.list().data
        assert entry.id == "plain" and entry.adapter is False
        assert ask(url, model="plain").choices[0].message.content == generate(
            model, tok, [build_prompt([], QUESTION)], max_new_tokens=16)[0]
    finally:
        server.should_exit = True


def test_api_key_is_required_when_set_and_page_is_served(chat_model):
    with serving(chat_model, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert [m.id for m in client(url, key="s3cret").models.list().data] == ["tiny", "tiny:base"]
        u = urlparse(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and b"falcon-qlora chat" in page.read()


def test_other_hosts_need_an_api_key_or_insecure(capsys):
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", "key", False)
    check_bind("0.0.0.0", None, True)
    assert main(["serve", "--adapter", "nowhere", "--host", "0.0.0.0"]) == 2   # refused before loading anything
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api_key" in err and "--insecure" in err


def test_a_taken_port_is_reported_before_the_model_loads(capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--adapter", "nowhere", "--port", str(s.getsockname()[1])]) == 2
    assert "--port" in capsys.readouterr().err


def test_prompts_and_answers_are_written_only_with_log_dir(chat_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with serving(chat_model) as (url, _):
        ask(url, messages=[{"role": "user", "content": "what is one plus four?"}])
    assert not any(tmp_path.iterdir())
    with serving(chat_model, log_dir=tmp_path / "logs") as (url, _):
        answer = ask(url, messages=[{"role": "user", "content": "what is one plus four?"}])
    [row] = [json.loads(x) for x in (tmp_path / "logs" / "requests.jsonl").read_text().splitlines()]
    assert row["messages"][0]["content"] == "what is one plus four?"
    assert row["answer"] == answer.choices[0].message.content


# ------------------------------------------------------------------------------------------ the page, in chromium
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests drive chromium with playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium here (.ci/run installs Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


def answer_in(page, column: str):
    return page.locator(f".column[data-model={column}] .msg.assistant").last


def test_page_streams_the_answer_into_the_chat(server, chat_model, browser):
    url, engine = server
    card = '{"name": "two", "age": 5}'
    page = browser.new_page()
    page.goto(url)
    with scripted(engine, chat_model[1], " " + card, delay=0.05):
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_function("() => { const m = document.querySelector('.column[data-model=adapter] "
                               ".msg.assistant'); return m && m.dataset.state === 'streaming' && "
                               "m.textContent.length > 4 }", timeout=30_000)
        partial = answer_in(page, "adapter").text_content()
        page.wait_for_selector(".column[data-model=adapter] .msg.assistant[data-state=done]", timeout=30_000)
    assert partial and card.startswith(partial) and len(partial) < len(card)       # seen while it streamed
    assert answer_in(page, "adapter").text_content() == card + "valid JSON"       # the answer and its badge
    assert page.locator(".column[data-model=base]").is_hidden()
    page.close()


def test_page_side_by_side_shows_base_and_adapter_answers(server, browser):
    url, _ = server
    base, tuned = ask(url, model="tiny:base").choices[0].message.content, ask(url).choices[0].message.content
    page = browser.new_page()
    page.goto(url)
    page.fill("#max_tokens", "16")
    page.check("#sbs")
    page.fill("#prompt", QUESTION)
    page.click("#send")
    for column in ("base", "adapter"):
        page.wait_for_selector(f".column[data-model={column}] .msg.assistant[data-state=done]", timeout=30_000)
    assert answer_in(page, "base").text_content() == base + "not JSON"
    assert answer_in(page, "adapter").text_content() == tuned + "not JSON"
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.close()


def test_conversation_prompt_is_the_one_chat_builds(chat_model):
    _, tok = chat_model
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello."},
                {"role": "user", "content": "what is one plus one?"}]
    prompt, stops = render(tok, messages)
    assert prompt == build_prompt([("hi", "hello.")], "what is one plus one?")
    assert "### Human:" in stops
