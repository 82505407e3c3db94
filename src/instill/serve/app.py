"""The OpenAI-compatible HTTP layer: validation, auth, limits, SSE; generation is the
scheduler's."""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from instill.data.render import end_of_turn_ids, render_prompt
from instill.infer.generate import GenParams
from instill.serve.scheduler import Job, Scheduler

ROLES = ("system", "user", "assistant")
PAGE = Path(__file__).with_name("page.html")
NO_TEMPLATE = (
    "the model has no chat template, so /v1/chat/completions cannot render messages; restart "
    "instill serve with --chat-template FILE (a Jinja chat template), or send a raw prompt to "
    "/v1/completions"
)


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    max_batch: int = 8
    max_concurrent: int = 64
    max_tokens_cap: int = 1024
    max_n: int = 1
    max_body_bytes: int = 1_000_000


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


def _number(body: dict, name: str, default, lo, hi, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def _params(body: dict, cfg: ServeConfig) -> GenParams:
    cap = cfg.max_tokens_cap
    max_tokens = _number(body, "max_tokens", min(256, cap), 1, cap, integer=True)
    _number(body, "n", 1, 1, cfg.max_n, integer=True)
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    return GenParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0 if "temperature" in body else 0.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=_number(body, "top_k", 0, 0, 100_000, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-9, 10.0),
        seed=seed,
        stop=tuple(stop),
    )


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        if not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Server:
    def __init__(self, model, tokenizer, names: list[str], cfg: ServeConfig):
        self.model, self.tokenizer, self.names, self.cfg = model, tokenizer, names, cfg
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.scheduler = Scheduler(model, tokenizer, end_of_turn_ids(tokenizer), cfg.max_batch)
        self.active = 0
        self.lock = threading.Lock()

    def check_model(self, body: dict) -> str:
        name = body.get("model")
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

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, NO_TEMPLATE, "messages")
            messages = _messages(body)
            try:
                ids = render_prompt(self.tokenizer, messages)
            except Exception as exc:  # the template is the model's code: its errors are the
                # request's (raise_exception on a role it refuses, a missing field), not ours
                raise ApiError(
                    400, f"the chat template refused these messages: {exc}", "messages"
                ) from None
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' is required: a string", "prompt")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        return ids

    def job(self, body: dict, chat: bool) -> tuple[str, Job]:
        name = self.check_model(body)
        ids = self.prompt_ids(body, chat)
        params = self._params(body)
        if len(ids) + params.max_new_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_new_tokens}) "
                f"exceeds the model's context length of {self.context} tokens",
                "messages" if chat else "prompt",
            )
        return name, Job(prompt=ids, params=params)

    def _params(self, body: dict) -> GenParams:
        return _params(body, self.cfg)

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


def _stream(server: Server, job: Job, name: str, chat: bool, request: Request):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    pieces: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job.on_text = lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text)
    include_usage = bool((request.state.body.get("stream_options") or {}).get("include_usage"))

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
            while not (job.done.is_set() and pieces.empty()):
                try:
                    yield chunk(await asyncio.wait_for(pieces.get(), 0.05), None)
                except TimeoutError:
                    continue
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


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="instill", docs_url=None, redoc_url=None)
    cfg = server.cfg

    # Checked inside each route, not in an @app.middleware: starlette's BaseHTTPMiddleware makes
    # request.is_disconnected() report a disconnect while a stream is still being read.
    def refused(request: Request) -> JSONResponse | None:
        if cfg.api_key is not None:
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                return _error(
                    401,
                    "missing or invalid API key (send 'Authorization: Bearer KEY')",
                    kind="invalid_api_key",
                )
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > cfg.max_body_bytes:
            return _error(413, f"request body over the {cfg.max_body_bytes}-byte limit")
        return None

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise ApiError(413, f"request body over the {cfg.max_body_bytes}-byte limit")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        request.state.body = body
        return body

    async def complete(request: Request, chat: bool):
        if (denied := refused(request)) is not None:
            return denied
        try:
            body = await body_of(request)
            name, job = server.job(body, chat)
        except ApiError as err:
            return _error(err.status, err.message, err.param, err.kind)
        if not server.admit():
            return _error(
                429,
                f"server busy: {cfg.max_concurrent} requests in flight; retry",
                kind="rate_limit_exceeded",
            )
        if body.get("stream"):
            return _stream(server, job, name, chat, request)
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
        text = PAGE.read_text(encoding="utf-8").replace("__MODEL__", html.escape(server.names[0]))
        return text.replace("__MAX_TOKENS__", str(min(256, cfg.max_tokens_cap)))

    return app
