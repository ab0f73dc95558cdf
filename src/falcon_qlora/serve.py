"""A web chat and an OpenAI-compatible API for a trained adapter, on one 4-bit base in memory.

    falcon-qlora serve --adapter demo-run/final                 # http://127.0.0.1:8000 : chat page, side by side
    falcon-qlora serve --adapter results/final --host 0.0.0.0 --api_key "$KEY"
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="demo-run", messages=[{"role": "user", "content": "Hi"}], stream=True)

Two model ids share the loaded weights: the run's name (base + adapter) and "<name>:base" (the adapter switched off),
which is how the page answers side by side. Binding to anything but 127.0.0.1 needs --api_key (or the
FALCON_QLORA_API_KEY variable) or an explicit --insecure. Nothing a client sends is written to disk unless --log_dir.
Needs the serve extra: pip install "falcon-qlora[serve]".
"""

import hmac
import json
import os
import threading
import time
import uuid
from pathlib import Path

from .errors import UserError
from .serve_engine import Engine, Job, QueueFull, events, prepare_tokenizer, render, sse, usage

PAGE = Path(__file__).parent / "web" / "index.html"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _schemas():
    """Pydantic models of the accepted request: unknown fields are errors, not silently ignored."""
    from typing import Literal, Union

    from pydantic import BaseModel, ConfigDict, Field

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")
        role: Literal["system", "user", "assistant"]
        content: Union[str, list[TextPart]]
        name: str | None = None

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        include_usage: bool = False

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str
        messages: list[Message] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        repetition_penalty: float | None = Field(None, gt=0)
        stop: Union[str, list[str], None] = None
        seed: int | None = None
        n: int = Field(1, ge=1, le=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None
    return ChatRequest


def build_app(model, tok, name: str = "model", *, api_key: str | None = None, max_tokens_cap: int = 1024,
              queue_size: int = 8, log_dir: str | Path | None = None, context: int | None = None,
              generate_kwargs: dict | None = None):
    """The FastAPI app: GET / (the chat page), GET /v1/models, POST /v1/chat/completions (streamed or not).
    `context` defaults to the model's max_position_embeddings; generate_kwargs go to model.generate as they are."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, StreamingResponse
    ChatRequest = _schemas()
    prepare_tokenizer(tok)
    engine = Engine(model, tok, queue_size=queue_size, generate_kwargs=generate_kwargs)
    context = context or getattr(model.config, "max_position_embeddings", None) or 2048
    ids = {name: False, **({f"{name}:base": True} if engine.has_adapter else {})}   # id -> adapter switched off
    created = int(time.time())
    app = FastAPI(title="falcon-qlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return await call_next(request)

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/v1/models")
    async def models():
        data = [{"id": i, "object": "model", "created": created, "owned_by": "falcon-qlora",
                 "adapter": engine.has_adapter and not off,
                 "max_tokens": max_tokens_cap, "context": context} for i, off in ids.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        req = await _parse(request, ChatRequest)
        if not isinstance(req, ChatRequest):
            return req
        if req.model not in ids:
            return _error(404, f"model '{req.model}' is not served here; use one of {list(ids)}", "model",
                          "model_not_found")
        if req.messages[-1].role != "user":
            return _error(400, "the last message must be the user's (role 'user')", "messages", "invalid_value")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or not all(stops):
            return _error(400, "stop: at most 4 non-empty strings", "stop", "invalid_value")
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > max_tokens_cap:
            return _error(400, f"max_tokens {wanted} is over this server's cap of {max_tokens_cap}", "max_tokens",
                          "max_tokens_too_large")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt, template_stops = render(tok, messages)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= context:
            return _error(400, f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}: "
                          "send fewer or shorter messages", "messages", "context_length_exceeded")
        sampling = {"do_sample": False}
        if req.temperature:       # absent or 0: greedy, the answer the adapter was trained to give
            sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p or 1.0,
                        "top_k": req.top_k if req.top_k is not None else 0}
        if req.repetition_penalty:
            sampling["repetition_penalty"] = req.repetition_penalty
        job = Job(prompt_ids, min(wanted or max_tokens_cap, context - len(prompt_ids)), template_stops + stops,
                  base=ids[req.model], sampling=sampling, seed=req.seed)
        try:
            engine.submit(job)
        except QueueFull:
            return _error(429, f"the server is busy: {queue_size} requests are already waiting; retry shortly",
                          code="queue_full")
        meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model)
        if req.stream:
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, request, meta, with_usage, lambda: log(meta, messages, job)),
                                     media_type="text/event-stream")
        async for kind, value in events(job, request):
            if kind == "error":
                return _error(500, f"generation failed: {value}", code="generation_error")
        log(meta, messages, job)
        return {**meta, "object": "chat.completion", "usage": usage(job),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                             "finish_reason": job.finish_reason, "logprobs": None}]}

    def log(meta: dict, messages: list[dict], job: Job) -> None:
        if log_dir is None:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        row = {**meta, "messages": messages, "answer": job.text, "finish_reason": job.finish_reason,
               "usage": usage(job)}
        with open(Path(log_dir) / "requests.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return app


async def _parse(request, schema):
    """The validated request, or a 400 that names the first problem."""
    from pydantic import ValidationError
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _error(400, "the request body is not valid JSON", code="invalid_json")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            return _error(400, f"unknown field '{where}'", where, "unknown_field")
        return _error(400, f"{where or 'body'}: {first.get('msg')}", where or None, "invalid_value")


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Only this machine may talk to a server without a key, unless the user says otherwise in so many words."""
    if host not in LOCAL_HOSTS and not api_key and not insecure:
        raise UserError(f"--host {host} lets other machines use the model: give --api_key KEY (or set "
                        "FALCON_QLORA_API_KEY) so that clients must send it, or --insecure to serve without one")


def check_port(host: str, port: int) -> None:
    """Fail before the model loads (minutes for a 7B) rather than after, when the port is taken."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pass another --port, "
                            "or another --host") from None


def run_name(adapter: str | None, base: str | None) -> str:
    """The model id clients use: the run folder's name for results/final or results/checkpoint-N, else the folder."""
    if adapter is None:
        return Path(str(base)).name
    from .rundir import run_of
    p = Path(adapter).resolve()
    return (run_of(p) or p).name


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run the app with uvicorn in a daemon thread (notebooks, tests): -> (server, url). server.should_exit = True
    stops it. port 0 picks a free port."""
    import socket

    import uvicorn
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    threading.Thread(target=server.run, name="falcon-qlora-serve", daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://{host}:{port}"


def show_inline(url: str, height: int = 640) -> None:
    """Show the chat page in a notebook's output: Colab proxies the kernel's port into an iframe; Jupyter can load
    the local URL directly."""
    from IPython.display import IFrame, display
    try:
        from google.colab import output
    except ImportError:
        print(f"chat page: {url}/   OpenAI API: {url}/v1")
        display(IFrame(url + "/", width="100%", height=height))
    else:
        output.serve_kernel_port_as_iframe(int(url.rsplit(":", 1)[1]), height=str(height))


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UserError(f"serve needs {err.name}: pip install \"falcon-qlora[serve]\"") from None


def cli(argv: list[str]) -> int:
    from .cli import CommandParser
    p = CommandParser(prog="falcon-qlora serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", help="adapter folder written by `falcon-qlora train` (e.g. results/final)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("FALCON_QLORA_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (default: $FALCON_QLORA_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow another --host without --api_key")
    p.add_argument("--name", help="model id in the API (default: the run folder's name)")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="cap on max_tokens per request")
    p.add_argument("--queue_size", type=int, default=8, help="requests that may wait; more get 429")
    p.add_argument("--log_dir", help="append every request and answer to LOG_DIR/requests.jsonl (off by default)")
    p.add_argument("--bf16", action="store_true", help="load the base unquantized in bf16 instead of 4-bit")
    a = p.parse_args(argv)
    check_bind(a.host, a.api_key, a.insecure)
    check_port(a.host, a.port)
    if a.max_new_tokens < 1 or a.queue_size < 0:
        raise UserError("--max_new_tokens must be >= 1 and --queue_size >= 0")
    _require_extra()
    import uvicorn

    from .chat import load_chat_model
    model, tok = load_chat_model(a.adapter, a.base, a.bf16)
    name = a.name or run_name(a.adapter, a.base)
    app = build_app(model, tok, name, api_key=a.api_key, max_tokens_cap=a.max_new_tokens,
                    queue_size=a.queue_size, log_dir=a.log_dir)
    shown = f"[{a.host}]" if ":" in a.host else a.host
    print(f"falcon-qlora serve: chat page http://{shown}:{a.port}/ ; OpenAI API http://{shown}:{a.port}/v1 "
          f"(model '{name}'" + (f", '{name}:base' without the adapter)" if a.adapter else ")"), flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0
