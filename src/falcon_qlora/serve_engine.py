"""The generation side of `falcon-qlora serve`: one model, one request at a time, a bounded queue in front of it.

A worker thread owns the model. Requests become Jobs; `Engine.submit` puts one in the queue or raises QueueFull (the
server answers 429). The worker runs `model.generate` with a streamer that cuts the text at the first stop string
(the chat template's next user turn, or the request's `stop`), holds back any tail that could still become one, and
hands the rest to the job's asyncio queue. Generation ends at a stop string (chat.stop_on_text) or as soon as the job
is cancelled (the client went away), so an abandoned request costs at most one more token. `events` and `sse` carry
a job's output to its HTTP response and notice a client that has gone.
The base model's answer for side-by-side comparison comes from the same weights with the adapter switched off.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from . import template
from .chat import SettledStreamer, stop_on_text

DISCONNECT_POLL_S = 0.25   # how often a waiting or streaming request checks that its client is still there


def prepare_tokenizer(tok) -> None:
    """Give the tokenizer the run's chat template (once, at load)."""
    template.ensure_template(tok)


def render(tok, messages: list[dict]) -> tuple[str, list[str]]:
    """(prompt text ending in an open assistant turn, stop strings) for OpenAI-style messages, in the run's chat
    template: the format the adapter was trained on."""
    return template.render(tok, messages, add_generation_prompt=True), list(template.stop_strings(tok))


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    stops: list[str]
    base: bool = False                  # answer with the adapter switched off
    sampling: dict = field(default_factory=dict)
    seed: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    seconds_to_first_token: float | None = None

    def emit(self, kind: str, value=None) -> None:
        """Hand an event ("delta", text) / ("done", None) / ("error", message) to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:    # the server's event loop has closed: nobody is listening any more
            pass


class _JobStreamer(SettledStreamer):
    """Streamer for model.generate: emits only the part of the answer that is final (chat.settled) as "delta" events;
    a tail like "### Hu" waits."""

    def __init__(self, tok, job: Job, start: float):
        super().__init__(tok, job.stops)
        self.job, self.start, self.sent = job, start, 0

    def put(self, value) -> None:
        if not self.skip_prompt and self.job.seconds_to_first_token is None:   # the first generated token
            self.job.seconds_to_first_token = time.perf_counter() - self.start
        super().put(value)

    def show(self, text: str) -> None:
        if len(text) > self.sent and text.startswith(self.job.text):
            self.job.emit("delta", text[self.sent:])
            self.job.text, self.sent = text, len(text)


class Engine:
    """Owns the model: a worker thread generates for one Job at a time; at most `queue_size` Jobs wait."""

    def __init__(self, model, tok, queue_size: int = 8, generate_kwargs: dict | None = None):
        self.model, self.tok = model, tok
        model.eval()    # no dropout: an answer depends on the prompt and the sampling settings only
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.generate_kwargs = dict(generate_kwargs or {})
        self.finished: deque = deque(maxlen=64)   # (completion_tokens, finish_reason) of the latest jobs
        self.busy = threading.Event()
        self.has_adapter = hasattr(model, "disable_adapter")
        threading.Thread(target=self._work, name="falcon-qlora-generate", daemon=True).start()

    def submit(self, job: Job) -> Job:
        """Queue a job whose events go to the running event loop. Raises QueueFull when no place is left."""
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    def idle(self) -> bool:
        return self.jobs.empty() and not self.busy.is_set()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            self.busy.set()
            try:
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                else:
                    self._generate(job)
                job.emit("done")
            except Exception as err:  # the request fails, the server goes on
                job.finish_reason = "error"
                job.emit("error", f"{type(err).__name__}: {err}")
            finally:
                self.finished.append((job.completion_tokens, job.finish_reason))
                self.busy.clear()

    def _generate(self, job: Job) -> None:
        import contextlib

        import torch
        from transformers import StoppingCriteria
        start = time.perf_counter()
        streamer = _JobStreamer(self.tok, job, start)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), job.cancel.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        device = next(self.model.parameters()).device
        ids = torch.tensor([job.prompt_ids], device=device)
        if job.seed is not None:
            torch.manual_seed(job.seed)
        stopping = stop_on_text(self.tok, job.stops, ids.shape[1])
        stopping.append(_Cancelled())
        off = self.model.disable_adapter() if job.base and self.has_adapter else contextlib.nullcontext()
        with off, torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=job.max_new_tokens, streamer=streamer,
                                      stopping_criteria=stopping,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id,
                                      use_cache=True, **job.sampling, **self.generate_kwargs)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.tok.eos_token_id
        job.completion_tokens = len(new)
        if job.cancel.is_set() and not streamer.stopped:
            job.finish_reason = "cancelled"
        elif streamer.stopped or (eos is not None and eos in new):
            job.finish_reason = "stop"
        else:
            job.finish_reason = "length"


def usage(job: Job) -> dict:
    n = len(job.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": job.completion_tokens, "total_tokens": n + job.completion_tokens}


async def events(job: Job, request):
    """The job's events until it is done. The connection is checked every DISCONNECT_POLL_S, also while tokens
    flow: a client that went away cancels the job, and generation stops at the next token."""
    checked = time.monotonic()
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                kind = value = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if kind is None:
                continue
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        job.cancel.set()


async def sse(job: Job, request, meta: dict, include_usage: bool, on_done):
    """Server-sent events in OpenAI's chunk format, ending with 'data: [DONE]'."""
    def chunk(delta: dict, finish=None) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in events(job, request):
        if kind == "delta":
            yield chunk({"content": value})
        elif kind == "error":
            err = {"error": {"message": f"generation failed: {value}", "type": "server_error"}}
            yield f"data: {json.dumps(err)}\n\n"
            return
    if job.finish_reason in ("stop", "length"):
        on_done()
        yield chunk({}, job.finish_reason)
        if include_usage:
            tail = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(job)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
