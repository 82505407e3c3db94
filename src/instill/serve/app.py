"""The OpenAI-compatible HTTP layer: validation, auth, limits, SSE; generation is the
engine's, run by the scheduler's decode thread.

    request -> Host check (every route) -> API key -> Content-Type -> body (read up to the limit)
            -> parsed and validated whole (requests.py: OpenAI's types and ranges, 400 naming
               the field) -> model, prompt tokens, context -> a concurrency slot -> Job
            -> scheduler -> one JSON reply, or SSE chunks ending in [DONE] (an error event if
               generation failed); a client that hangs up cancels its job and frees its slot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import ipaddress
import json
import socket
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from instill.config import ServeConfig
from instill.data.render import render_prompt
from instill.errors import InstillError
from instill.serve.requests import (
    DEFAULT_MAX_TOKENS,
    ChatBody,
    CompletionBody,
    InvalidRequest,
    parse,
)
from instill.serve.scheduler import Job, Scheduler

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
PAGE = Path(__file__).with_name("page.html")
NO_TEMPLATE = (
    "the model has no chat template, so /v1/chat/completions cannot render messages; restart "
    "instill serve with --chat-template FILE (a Jinja chat template), or send a raw prompt to "
    "/v1/completions"
)


def host_name(value: str) -> str:
    """The name in a Host header or an --allowed-host value: lower case, no port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    host = host_name(host)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(cfg: ServeConfig) -> frozenset[str] | None:
    """The Host header names this server answers to; None answers any (`--allowed-host '*'`).

    Checking them stops DNS rebinding: a web page on evil.example whose name is made to
    resolve to 127.0.0.1 reaches a loopback server as its own origin, but its requests still
    say `Host: evil.example`."""
    if "*" in cfg.allowed_hosts:
        return None
    bound = host_name(cfg.host)
    names = {bound, *(host_name(h) for h in cfg.allowed_hosts)}
    if bound in ("0.0.0.0", "::", ""):  # every interface: loopback and this machine's name
        names = (names - {"0.0.0.0", "::", ""}) | LOOPBACK | {socket.gethostname().lower()}
    elif is_loopback(bound):
        names |= LOOPBACK
    return frozenset(names)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def _error_body(status: int, message: str, param: str | None = None, kind: str = "") -> dict:
    err = ApiError(status, message, param, kind)
    return {"error": {"message": message, "type": err.kind, "param": param, "code": None}}


def _error(status: int, message: str, param: str | None = None, kind: str = "") -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, kind), status_code=status)


class Server:
    """The requests' side of serving: names, parsing, limits, concurrency slots. What decodes is
    the scheduler (submit(job), close()); prompts become token ids through chat_ids/text_ids.
    serve/llamacpp.py puts llama.cpp behind the same three."""

    def __init__(self, model, tokenizer, names: list[str], cfg: ServeConfig):
        self.model, self.tokenizer, self.names, self.cfg = model, tokenizer, names, cfg
        self.context = self._context()
        self._check_template()
        self.scheduler = self._scheduler()
        self.active = 0
        self.lock = threading.Lock()

    def _context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def _scheduler(self):
        return Scheduler(self.model, self.tokenizer, self.cfg.max_batch)

    def _check_template(self) -> None:
        """Refuse to start when no chat request could fit: the template's fixed text around a
        one-letter message (its fixed head, which the engine prefills once, and the tail that
        opens the reply) leaves no room for a token of reply in the context."""
        if not getattr(self.tokenizer, "chat_template", None):
            return
        try:
            a, b = (self.chat_ids([{"role": "user", "content": c}]) for c in "AZ")
        except Exception:  # a template that refuses a lone user turn: each request hears why
            return
        head = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        if len(a) + 1 > self.context:
            raise InstillError(
                f"the chat template's fixed head is {head} tokens (a one-letter user message "
                f"renders to {len(a)}): with one token of reply that is over the context of "
                f"{self.context} tokens, so every chat request would be refused; give a "
                "shorter template with --chat-template FILE"
            )

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return render_prompt(self.tokenizer, messages)

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check_model(self, body: ChatBody | CompletionBody) -> str:
        name = body.model
        if name is None:
            return self.names[0]
        if name not in self.names:
            raise ApiError(
                404,
                f"model {name!r} is not served; served: {self.names}",
                "model",
                "model_not_found",
            )
        return name

    def prompt_ids(self, body: ChatBody | CompletionBody) -> list[int]:
        if isinstance(body, ChatBody):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, NO_TEMPLATE, "messages")
            messages = body.conversation()
            try:
                ids = self.chat_ids(messages)
            except Exception as exc:  # the template is the model's code: its errors are the
                # request's (raise_exception on a role it refuses, a missing field), not ours
                raise ApiError(
                    400, f"the chat template refused these messages: {exc}", "messages"
                ) from None
        else:
            ids = self.text_ids(body.prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def job(self, body: ChatBody | CompletionBody) -> tuple[str, Job]:
        """The body's job; `body` is already valid in itself (requests.py): what is left to
        check needs this server (its model names, template, context)."""
        chat = isinstance(body, ChatBody)
        name = self.check_model(body)
        ids = self.prompt_ids(body)
        params = body.gen_params(self.cfg)
        if len(ids) + params.max_new_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_new_tokens}) "
                f"exceeds the model's context length of {self.context} tokens",
                "messages" if chat else "prompt",
            )
        return name, Job(prompt=ids, params=params)

    def admit(self) -> bool:
        with self.lock:
            if self.active >= self.cfg.max_concurrent:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self.lock:
            self.active -= 1


def _usage(job: Job) -> dict:
    p, c = len(job.prompt), len(job.ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _choice(job: Job, chat: bool) -> dict:
    if chat:
        msg = {"role": "assistant", "content": job.text}
        return {"index": 0, "message": msg, "finish_reason": job.finish_reason}
    return {"index": 0, "text": job.text, "finish_reason": job.finish_reason, "logprobs": None}


async def _wait(job: Job, request: Request) -> bool:
    """Wait for the job; False as soon as the client hangs up (looked at every 50 ms)."""
    tick = 0
    while not job.done.is_set():
        await asyncio.sleep(0.005)
        tick += 1
        if tick % 10 == 0 and await request.is_disconnected():
            return False
    return True


def _stream(server: Server, job: Job, name: str, chat: bool, include_usage: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    pieces: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        try:
            if chat:
                yield chunk(None, None, role=True)
            server.scheduler.submit(job)
            while not job.done.is_set():
                try:
                    yield chunk(await asyncio.wait_for(pieces.get(), 0.05), None)
                except TimeoutError:
                    continue
            # the generation thread's last pieces were scheduled on this loop before it set
            # done, but may not have run yet: one pass of the loop runs them (callbacks run in
            # the order they were scheduled), then the queue holds every piece
            await asyncio.sleep(0)
            while not pieces.empty():
                yield chunk(pieces.get_nowait(), None)
            if job.error:  # the status line went out long ago: an error event, which the openai
                # client raises as APIError (the non-streaming path answers 500)
                yield f"data: {json.dumps(_error_body(500, job.error))}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield chunk(None if chat else "", job.finish_reason)
            if include_usage:
                tail = {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": name,
                    "choices": [],
                    "usage": _usage(job),
                }
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # starlette closes this generator when the client hangs up (its disconnect listener
            # cancels the stream, which it always starts first); that lands here and frees the
            # batch row and the slot.
            job.cancelled.set()
            server.release()

    return StreamingResponse(events(), media_type="text/event-stream")


def chat_page(server: Server) -> str:
    """page.html with this server's model name, default max_tokens (the API's) and cap."""
    cap = server.cfg.max_tokens_cap
    text = PAGE.read_text(encoding="utf-8").replace("__MODEL__", html.escape(server.names[0]))
    text = text.replace("__MAX_TOKENS_CAP__", str(cap))
    return text.replace("__MAX_TOKENS__", str(min(DEFAULT_MAX_TOKENS, cap)))


def page_policy() -> str:
    """The page's Content-Security-Policy: its own inline script and style (by hash) and fetches
    to this server, nothing else. A second guard behind the page's escaping of replies: markup
    that got into a reply could still run no script (no inline handlers, no other scripts),
    load nothing and send nothing elsewhere."""
    text = PAGE.read_text(encoding="utf-8")

    def digest(tag: str) -> str:
        body = text.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    return (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class _HostCheck:
    """ASGI middleware: refuse a request whose Host header names another server (421).
    Plain ASGI, not @app.middleware: starlette's BaseHTTPMiddleware makes
    request.is_disconnected() report a disconnect while a stream is still being read."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.allowed is not None:
            given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(given) not in self.allowed:
                names = ", ".join(sorted(self.allowed))
                refusal = _error(
                    421,
                    f"Host header {given[:200]!r} does not name this server (it answers to "
                    f"{names}); to reach it by another name, start instill serve with "
                    "--allowed-host NAME",
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="instill", docs_url=None, redoc_url=None)
    cfg = server.cfg
    app.add_middleware(_HostCheck, allowed=allowed_hosts(cfg))
    too_big = f"request body over the {cfg.max_body_bytes}-byte limit"

    # Checked inside each route, not in an @app.middleware: starlette's BaseHTTPMiddleware makes
    # request.is_disconnected() report a disconnect while a stream is still being read.
    def refused(request: Request, has_body: bool = False) -> JSONResponse | None:
        if cfg.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                return _error(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer KEY')",
                    kind="invalid_api_key",
                )
        if not has_body:
            return None
        # A cross-site page may POST text/plain or a form without a CORS preflight; JSON may
        # only come with one, which this server never grants.
        declared = request.headers.get("content-type", "")
        if declared.split(";")[0].strip().lower() != "application/json":
            return _error(
                415, f"Content-Type must be application/json, got {declared[:100] or 'none'}"
            )
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > cfg.max_body_bytes:
            return _error(413, too_big)
        return None

    async def body_of(request: Request, chat: bool) -> ChatBody | CompletionBody:
        raw = bytearray()  # read piece by piece: a chunked body declares no length up front
        try:
            async with contextlib.aclosing(request.stream()) as pieces:
                async for piece in pieces:
                    raw += piece
                    if len(raw) > cfg.max_body_bytes:
                        raise ApiError(413, too_big)
        except ClientDisconnect:
            raise ApiError(400, "the client hung up before sending the whole body") from None
        try:
            return parse(bytes(raw), ChatBody if chat else CompletionBody, cfg)
        except InvalidRequest as exc:
            raise ApiError(400, exc.message, exc.param) from None

    async def complete(request: Request, chat: bool):
        if (denied := refused(request, has_body=True)) is not None:
            return denied
        try:
            body = await body_of(request, chat)
            name, job = server.job(body)
        except ApiError as err:
            return _error(err.status, err.message, err.param, err.kind)
        if not server.admit():
            return _error(
                429,
                f"server busy: {cfg.max_concurrent} requests in flight; retry",
                kind="rate_limit_exceeded",
            )
        if body.stream:
            return _stream(server, job, name, chat, body.include_usage)
        try:
            server.scheduler.submit(job)
            answered = await _wait(job, request)
        finally:
            job.cancelled.set()  # a hang-up stops the row at the next decode step
            server.release()
        if not answered:
            return _error(400, "the client hung up before the reply was ready")
        if job.error:
            return _error(500, job.error)
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": name,
            "choices": [_choice(job, chat)],
            "usage": _usage(job),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "instill"} for n in server.names
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": server.active}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page(server), headers={"Content-Security-Policy": page_policy()})

    return app
