"""The server driven by the official openai client on loopback, with the tiny model; the
continuous-batching scheduler driven directly."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from instill.serve import ServeConfig, Server, build_app

KEY = "sk-test-key"
MSG = [{"role": "user", "content": "Say something."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model, tokenizer, cfg: ServeConfig):
    """uvicorn in a thread on a free loopback port; returns (base url, Server, stop)."""
    return start_server(Server(model, tokenizer, ["tiny"], cfg))


def start_server(server: Server):
    import uvicorn

    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(server), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)

    def stop():
        uv.should_exit = True
        thread.join(10)
        server.scheduler.close()

    return f"http://127.0.0.1:{port}", server, stop


@pytest.fixture(scope="module")
def served(tokenizer):
    from conftest import build_tiny

    # untied: replies differ by prompt (the tied model answers every prompt with newlines, so
    # a reply sent to the wrong request would pass)
    base, server, stop = start(
        build_tiny(tokenizer, tied=False), tokenizer, ServeConfig(api_key=KEY, max_tokens_cap=64)
    )
    yield base, server
    stop()


def client(base, key=KEY):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def test_chat_matches_generate_and_usage_is_exact(served, tokenizer):
    from instill.data.render import render_prompt
    from instill.infer import GenParams, generate

    base, server = served
    reply = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=12)
    want = generate(server.model, tokenizer, [MSG], GenParams(max_new_tokens=12))[0]
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == want.finish_reason
    assert reply.usage.prompt_tokens == len(render_prompt(tokenizer, MSG)) == want.prompt_tokens
    assert reply.usage.completion_tokens == want.completion_tokens == 12  # random weights: no EOT
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming(served):
    base, _ = served
    c = client(base)
    whole = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=10)
    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_models(served, tokenizer):
    base, _ = served
    c = client(base)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5)
    assert r.usage.prompt_tokens == len(tokenizer("The capital of France is")["input_ids"])
    assert r.usage.completion_tokens == 5


def test_auth(served):
    base, _ = served
    with pytest.raises(openai.AuthenticationError) as err:
        client(base, key="wrong").chat.completions.create(model="tiny", messages=MSG)
    assert err.value.status_code == 401
    assert err.value.body["type"] == "invalid_api_key"
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/health").status_code == 200  # /health is open


def test_concurrent_greedy_equals_sequential(served):
    base, server = served
    c = client(base)
    prompts = [
        [{"role": "user", "content": f"Tell me about {w}."}]
        for w in ("cats", "the sea in winter and summer", "x", "numbers and letters together")
    ]
    one_by_one = [
        c.chat.completions.create(model="tiny", messages=m, max_tokens=16)
        .choices[0]
        .message.content
        for m in prompts
    ]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(
                lambda m: (
                    c.chat.completions.create(model="tiny", messages=m, max_tokens=16)
                    .choices[0]
                    .message.content
                ),
                prompts,
            )
        )
    assert together == one_by_one
    assert len(set(one_by_one)) == len(prompts)  # each its own reply: a mix-up would show


def test_disconnect_stops_generation_and_frees_the_slot(tokenizer):
    from conftest import build_tiny

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(max_concurrent=1))
    jobs = []
    submit = server.scheduler.submit
    server.scheduler.submit = lambda job: jobs.append(job) or submit(job)
    try:
        body = {"messages": MSG, "max_tokens": 900, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            while '"content": ""' in next(lines) or not jobs or not jobs[0].ids:
                pass  # until some generated text has arrived; then hang up
        assert jobs[0].done.wait(30)
        assert jobs[0].cancelled.is_set() and len(jobs[0].ids) < 900  # stopped early
        deadline = time.monotonic() + 10
        while server.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.active == 0
        reply = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
        assert reply.json()["usage"]["completion_tokens"] == 3  # the one slot is free again
    finally:
        stop()


def _run(scheduler, tokenizer, msgs, params, **kw):
    from instill.data.render import render_prompt
    from instill.serve.scheduler import Job

    return scheduler.submit(Job(render_prompt(tokenizer, msgs), params, **kw))


def test_a_new_request_streams_while_a_long_one_is_mid_generation(served, tokenizer):
    from instill.data.render import render_prompt
    from instill.infer import GenParams
    from instill.serve.scheduler import Job

    _, server = served
    sched, seen = server.scheduler, {}
    short_msgs = [{"role": "user", "content": "Tell me about the sea in winter and summer."}]
    alone = _run(sched, tokenizer, short_msgs, GenParams(max_new_tokens=8))
    assert alone.done.wait(30)

    def on_short(text):  # runs on the decode thread: a snapshot of the long job right now
        seen.setdefault("long_done", long.done.is_set())
        seen.setdefault("long_ids", len(long.ids))

    def on_long(text):  # the long job is streaming: submit the short one now
        if "short" not in seen:
            seen["short"] = _run(
                sched, tokenizer, short_msgs, GenParams(max_new_tokens=8), on_text=on_short
            )

    long = Job(render_prompt(tokenizer, MSG), GenParams(max_new_tokens=600), on_text=on_long)
    sched.submit(long)  # bound before the decode thread can call on_short
    assert long.done.wait(120) and seen["short"].done.wait(30)
    assert seen["long_done"] is False and 0 < seen["long_ids"] < len(long.ids) == 600
    assert seen["short"].text == alone.text and seen["short"].finish_reason == "length"


class _Gate(threading.Event):
    """A `cancelled` flag whose first check holds the decode thread until `opened` is set;
    `entered` is set once the decode thread is held there."""

    def __init__(self, opened: threading.Event):
        super().__init__()
        self.opened, self.entered = opened, threading.Event()

    def is_set(self):
        self.entered.set()
        self.opened.wait(30)
        return super().is_set()


def test_mixed_params_share_a_batch_and_match_alone(served, tokenizer):
    from instill.infer import GenParams, generate

    _, server = served
    sched = server.scheduler
    convs = [
        [{"role": "user", "content": w}]
        for w in ("cats", "the sea in winter and summer", "x", "numbers and letters together")
    ]
    full = generate(server.model, tokenizer, [convs[3]], GenParams(max_new_tokens=12))[0]
    greedy = [
        GenParams(max_new_tokens=16),
        GenParams(max_new_tokens=5, repetition_penalty=1.3),
        GenParams(max_new_tokens=9, top_k=3),
        GenParams(max_new_tokens=12, stop=(full.text[4:7],)),
    ]
    want = [
        generate(server.model, tokenizer, [c], p)[0] for c, p in zip(convs, greedy, strict=True)
    ]
    stop = greedy[3].stop[0]
    assert want[3].finish_reason == "stop" and want[3].text == full.text[: full.text.index(stop)]
    sampled = GenParams(max_new_tokens=14, temperature=0.9, top_p=0.9, top_k=40, seed=11)
    first = _run(sched, tokenizer, convs[0], sampled)
    assert first.done.wait(30)

    opened, rows, pieces = threading.Event(), [], [[] for _ in range(5)]

    def collect(i):
        def on_text(text):  # on the decode thread: how many rows share the batch right now
            rows.append(len(sched.rows))
            pieces[i].append(text)

        return on_text

    gate = _Gate(opened)
    _run(sched, tokenizer, MSG, GenParams(max_new_tokens=20), cancelled=gate)
    # the jobs go in only once the decode thread is held: taken with the gate, some of them
    # could start (and the stop-string one finish) before the rest were queued
    assert gate.entered.wait(30)
    params = greedy + [sampled]
    jobs = [
        _run(sched, tokenizer, c, p, on_text=collect(i))
        for i, (c, p) in enumerate(zip(convs + convs[:1], params, strict=True))
    ]
    opened.set()
    assert all(j.done.wait(60) for j in jobs)
    assert max(rows) == len(jobs) + 1  # all of them ran in one batch beside the gate job
    assert [j.text for j in jobs[:4]] == [w.text for w in want]
    assert len({w.text for w in want}) == 4
    assert [j.finish_reason for j in jobs[:4]] == [w.finish_reason for w in want]
    assert [len(j.ids) for j in jobs[:4]] == [w.completion_tokens for w in want]
    assert jobs[4].text == first.text and len(jobs[4].ids) == 14  # seeded: same beside others
    assert ["".join(p) for p in pieces] == [j.text for j in jobs]  # stop string held back


def test_a_failing_batch_fails_its_jobs_and_the_thread_goes_on(served, tokenizer):
    from instill.infer import GenParams
    from instill.serve.scheduler import Job

    _, server = served
    bad = server.scheduler.submit(Job([len(tokenizer) + 5], GenParams(max_new_tokens=3)))
    assert bad.done.wait(30) and "generation failed" in bad.error
    ok = _run(server.scheduler, tokenizer, MSG, GenParams(max_new_tokens=3))
    assert ok.done.wait(30) and ok.error is None and len(ok.ids) == 3


BAD = [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny"}).encode(), 400, "messages"),
    (
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
        400,
        "messages[0].role",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
        400,
        "messages[0].content",
    ),
    (json.dumps({"messages": MSG, "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": 65}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": MSG, "temperature": 3}).encode(), 400, "temperature"),
    (json.dumps({"messages": MSG, "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"messages": MSG, "n": 2}).encode(), 400, "n"),
    (json.dumps({"messages": MSG, "model": "/etc/passwd"}).encode(), 404, "model"),
    (
        json.dumps({"messages": [{"role": "user", "content": "word " * 1100}]}).encode(),
        400,
        "messages",
    ),
    (json.dumps({"messages": [{"role": "user", "content": "a" * 1_100_000}]}).encode(), 413, None),
    (json.dumps({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "stop"),
    (json.dumps({"messages": MSG, "stop": "x" * 257}).encode(), 400, "stop"),
    (
        json.dumps({"messages": MSG, "stream": True, "stream_options": 1}).encode(),
        400,
        "stream_options",
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
        ).encode(),
        400,
        "messages[0].content[0]",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}]}).encode(),
        400,
        "messages[0].content[0].text",
    ),
    (
        json.dumps({"messages": [MSG[0], {"role": 5, "content": "x"}]}).encode(),
        400,
        "messages[1].role",
    ),
    (
        json.dumps({"messages": [{"role": ["user"], "content": "x"}]}).encode(),
        400,
        "messages[0].role",
    ),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    (b'{"messages": [], "x": ' + b"[" * 300 + b"]" * 300 + b"}", 400, None),
    (json.dumps({"messages": MSG, "seed": 2**64}).encode(), 400, "seed"),
    (json.dumps({"messages": MSG, "seed": -(2**63) - 1}).encode(), 400, "seed"),
    (json.dumps({"messages": MSG, "seed": 1.5}).encode(), 400, "seed"),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1' + b"0" * 5000 + b"}", 400, None),
    (json.dumps({"messages": MSG, "max_tokens": 2.0}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": MSG, "max_tokens": True}).encode(), 400, "max_tokens"),
    (
        json.dumps({"messages": MSG, "max_completion_tokens": 0}).encode(),
        400,
        "max_completion_tokens",
    ),
    (json.dumps({"messages": MSG, "temperature": "0.5"}).encode(), 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    (json.dumps({"messages": MSG, "presence_penalty": -2.5}).encode(), 400, "presence_penalty"),
    (json.dumps({"messages": MSG, "frequency_penalty": 2.5}).encode(), 400, "frequency_penalty"),
    (json.dumps({"messages": MSG, "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({"messages": MSG, "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"messages": MSG, "model": 5}).encode(), 400, "model"),
    (json.dumps({"messages": MSG, "user": 5}).encode(), 400, "user"),
    (json.dumps([MSG]).encode(), 400, None),
]


@pytest.mark.parametrize("raw,status,param", BAD)
def test_bad_input_is_4xx_and_server_keeps_serving(served, raw, status, param):
    base, _ = served
    r = httpx.post(
        base + "/v1/chat/completions",
        content=raw,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    if param == "messages" and "word" in raw.decode()[:40]:
        assert "context length of 1024" in err["message"]
    ok = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert ok.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "body,message",
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "'stop' takes at most 4 strings, got 5"),
        (
            {"stop": ["a", "x" * 257]},
            "'stop' strings must be at most 256 characters; stop[1] has 257",
        ),
        (
            {"messages": [MSG[0], {"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[1].content[0] is a 'image_url' part; this server reads text parts only",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text must be a string",
        ),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "messages[0].role must be one of system, developer, user, assistant",
        ),
    ],
)
def test_bad_stop_lists_and_content_parts_say_what_is_wrong(served, body, message):
    base, _ = served
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"messages": MSG, "max_tokens": 2, **body},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message


def test_too_many_concurrent_requests_get_429(tokenizer):
    from conftest import build_tiny

    from instill.infer import GenParams
    from instill.serve.scheduler import Job

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(max_concurrent=1))
    gate = threading.Event()

    class Blocking(threading.Event):
        def is_set(self):  # the decode thread asks this before and during the job
            gate.wait(10)
            return False

    # A job that holds the decode thread until the gate opens: the HTTP request below is then
    # in flight (queued) for as long as the test needs.
    server.scheduler.submit(Job([1, 2, 3], GenParams(max_new_tokens=2), cancelled=Blocking()))
    try:
        body = {"messages": MSG, "max_tokens": 2, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body) as held:
            lines = held.iter_lines()  # kept referenced: a collected iterator hangs up
            next(lines)
            assert server.active == 1
            r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 1})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_exceeded"
            gate.set()
        r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 1})
        assert r.status_code == 200  # the slot came back
    finally:
        gate.set()
        stop()


def _fail_generation(monkeypatch, server):
    """Every forward pass of the decode thread raises, as a broken model or device would."""

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.scheduler, "_forward", boom)


@pytest.mark.parametrize("chat", [True, False])
def test_a_failed_generation_is_an_error_the_client_raises(served, monkeypatch, chat):
    base, server = served
    c = client(base)
    _fail_generation(monkeypatch, server)

    def create(**kw):
        if chat:
            return c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, **kw)
        return c.completions.create(model="tiny", prompt="Once upon", max_tokens=4, **kw)

    with pytest.raises(openai.APIError) as streamed:
        list(create(stream=True))
    assert streamed.value.message == "generation failed: boom"
    assert streamed.value.body == {
        "message": "generation failed: boom",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.InternalServerError) as whole:
        create()
    assert whole.value.status_code == 500 and whole.value.body == streamed.value.body
    monkeypatch.undo()
    assert server.active == 0
    assert create().usage.completion_tokens == 4  # the server goes on serving


def _raw_request(port: int, body: bytes, headers: str = "") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\n{headers}"
    )
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    s.sendall(head.encode() + b"\r\n" + body)
    return s


def _wait_until(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_a_non_streaming_request_is_cancelled_when_its_client_hangs_up(tokenizer):
    from conftest import build_tiny

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(max_concurrent=1))
    jobs = []
    submit = server.scheduler.submit
    server.scheduler.submit = lambda job: jobs.append(job) or submit(job)
    try:
        body = json.dumps({"messages": MSG, "max_tokens": 900}).encode()
        with _raw_request(int(base.rsplit(":", 1)[1]), body):
            assert _wait_until(lambda: jobs and jobs[0].ids)  # decoding; then hang up
        assert jobs[0].done.wait(30)
        assert jobs[0].cancelled.is_set() and len(jobs[0].ids) < 900  # stopped early
        assert _wait_until(lambda: server.active == 0, 10)
        reply = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
        assert reply.json()["usage"]["completion_tokens"] == 3  # the one slot is free again
    finally:
        stop()


def test_a_stream_whose_client_hangs_up_before_it_starts_frees_its_slot(served):
    """Driven as ASGI directly, so the hang-up lands exactly between the route's answer and the
    stream's first byte (starlette then cancels a body iterator that never started)."""
    import asyncio

    _, server = served
    body = json.dumps({"messages": MSG, "max_tokens": 50, "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {KEY}".encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    for _ in range(3):
        asyncio.run(build_app(server)(scope, receive, send))
        messages.append({"type": "http.request", "body": body, "more_body": False})
        assert server.active == 0


def test_completions_work_without_a_chat_template_and_chat_names_the_option(
    tokenizer, tiny_dir, tmp_path
):
    import shutil

    from instill.config import ModelConfig
    from instill.data.render import render_prompt
    from instill.serve import load_server

    model = tmp_path / "no-template"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").unlink()
    base, server, stop = start_server(load_server(str(model), ServeConfig()))
    try:
        assert not server.tokenizer.chat_template
        c = client(base)
        r = c.completions.create(model="no-template", prompt="Once upon a time", max_tokens=4)
        assert r.usage.completion_tokens == 4
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="no-template", messages=MSG, max_tokens=4)
        assert err.value.body["message"] == (
            "the model has no chat template, so /v1/chat/completions cannot render messages; "
            "restart instill serve with --chat-template FILE (a Jinja chat template), or send a "
            "raw prompt to /v1/completions"
        )
        assert err.value.body["param"] == "messages"
    finally:
        stop()
    template = (tiny_dir / "chat_template.jinja").read_text()
    (tmp_path / "t.jinja").write_text(template)
    base, server, stop = start_server(
        load_server(
            str(model),
            ServeConfig(),
            ModelConfig(name=str(model), chat_template=str(tmp_path / "t.jinja")),
        )
    )
    try:
        assert server.tokenizer.chat_template == template
        r = client(base).chat.completions.create(model="no-template", messages=MSG, max_tokens=4)
        assert r.usage.prompt_tokens == len(render_prompt(tokenizer, MSG))
    finally:
        stop()


def test_a_template_that_refuses_the_messages_is_a_400_with_its_message(tokenizer):
    import copy

    from conftest import build_tiny

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )
    base, _, stop = start(build_tiny(tokenizer), strict, ServeConfig())
    try:
        msgs = [{"role": "system", "content": "Be brief."}, *MSG]
        with pytest.raises(openai.BadRequestError) as err:
            client(base).chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
        assert err.value.body["message"] == (
            "the chat template refused these messages: System role not supported"
        )
        assert err.value.body["param"] == "messages"
        ok = client(base).chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert ok.usage.completion_tokens == 2
    finally:
        stop()


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_body_that_is_not_declared_json_is_415(served, content_type):
    base, _ = served
    headers = {"Authorization": f"Bearer {KEY}"}
    if content_type:
        headers["Content-Type"] = content_type
    body = json.dumps({"messages": MSG, "max_tokens": 2})
    r = httpx.post(base + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["message"] == (
        f"Content-Type must be application/json, got {content_type or 'none'}"
    )
    headers["Content-Type"] = "application/json; charset=utf-8"
    r = httpx.post(base + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "host,status",
    [
        ("evil.example", 421),
        ("evil.example:{port}", 421),
        ("127.0.0.1.evil.example", 421),
        ("", 421),
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LocalHost", 200),
        ("[::1]:{port}", 200),
    ],
)
def test_the_host_header_must_name_this_server(served, host, status):
    base, _ = served
    port = base.rsplit(":", 1)[1]
    value = host.format(port=port)
    for path in ("/health", "/", "/v1/models"):
        r = httpx.get(base + path, headers={"Host": value, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == status, (path, r.text)
    if status == 421:
        assert r.json()["error"]["message"] == (
            f"Host header {value!r} does not name this server (it answers to 127.0.0.1, ::1, "
            "localhost); to reach it by another name, start instill serve with "
            "--allowed-host NAME"
        )


def test_allowed_hosts_follow_the_bound_address_and_the_option():
    from instill.serve.app import allowed_hosts

    loop = {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts(ServeConfig()) == loop
    assert allowed_hosts(ServeConfig(host="::1")) == loop
    assert allowed_hosts(ServeConfig(host="localhost")) == loop
    assert allowed_hosts(ServeConfig(host="10.1.2.3")) == {"10.1.2.3"}
    assert allowed_hosts(
        ServeConfig(host="10.1.2.3", allowed_hosts=("Box.LAN:8000", "[fe80::1]"))
    ) == {"10.1.2.3", "box.lan", "fe80::1"}
    assert allowed_hosts(ServeConfig(host="0.0.0.0")) >= loop | {socket.gethostname().lower()}
    assert allowed_hosts(ServeConfig(host="10.1.2.3", allowed_hosts=("*",))) is None


def test_allowed_host_star_turns_the_check_off(tokenizer):
    from conftest import build_tiny

    base, _, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(allowed_hosts=("*",)))
    try:
        assert httpx.get(base + "/health", headers={"Host": "evil.example"}).status_code == 200
    finally:
        stop()


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(tokenizer):
    import select

    from conftest import build_tiny

    limit = 20_000
    base, _, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(max_body_bytes=limit))
    try:
        s = _raw_request(int(base.rsplit(":", 1)[1]), b"", "Transfer-Encoding: chunked\r\n")
        with s:
            piece, sent, reply = b"[" * 4096, 0, b""
            while sent < 50 * limit and b"\r\n\r\n" not in reply:
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
                if select.select([s], [], [], 0.01)[0]:
                    reply += s.recv(65536)
            if b"\r\n\r\n" not in reply:  # the old behaviour: answered after the whole body
                s.sendall(b"0\r\n\r\n")
                s.settimeout(30)
                reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert sent < 10 * limit  # refused while reading, not after reading everything
        ok = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        stop()


def test_list_content_and_the_developer_role_read_as_text_and_system(served, tokenizer):
    from instill.data.render import render_prompt

    base, _ = served
    c = client(base)
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "it."}],
        },
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say\nit."}]
    a = c.chat.completions.create(model="tiny", messages=parts, max_tokens=8)
    b = c.chat.completions.create(model="tiny", messages=plain, max_tokens=8)
    assert a.usage.prompt_tokens == len(render_prompt(tokenizer, plain)) == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def _cli(args, capsys, monkeypatch, env=None):
    """`instill serve ARGS` with the model load and uvicorn replaced; returns
    (exit code, stderr, what run_server or uvicorn received)."""
    import sys

    import instill.serve
    from instill.cli import main

    seen = {}
    for name in ("INSTILL_API_KEY",):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)

    class Fake:
        names = ["m"]

    def fake_load(model, cfg, spec=None):
        seen.update(model=model, cfg=cfg, chat_template=spec and spec.chat_template)
        return Fake()

    monkeypatch.setattr(instill.serve, "load_server", fake_load)
    monkeypatch.setattr(instill.serve, "build_app", lambda server: "app")
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(uvicorn=kw))
    monkeypatch.setattr(sys, "argv", ["instill", "serve", "m", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err, seen


def test_serve_options_reach_the_server(capsys, monkeypatch, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-from-file\n")
    code, err, seen = _cli(
        [
            "--chat-template",
            str(template),
            "--api-key-file",
            str(keyfile),
            "--allowed-host",
            "box.lan",
            "--allowed-host",
            "10.0.0.9",
            "--port",
            "8123",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    cfg = seen["cfg"]
    assert seen["chat_template"] == str(template)
    assert cfg.api_key == "sk-from-file" and cfg.allowed_hosts == ("box.lan", "10.0.0.9")
    assert cfg.host == "127.0.0.1" and seen["uvicorn"]["host"] == "127.0.0.1"
    assert seen["uvicorn"]["port"] == 8123
    assert "warning" not in err


def test_serve_reads_the_api_key_from_the_environment(capsys, monkeypatch):
    code, err, seen = _cli([], capsys, monkeypatch, env={"INSTILL_API_KEY": "sk-env"})
    assert code == 0 and seen["cfg"].api_key == "sk-env"
    assert "visible" not in err  # no hint to move it off the command line


def test_serve_key_on_the_command_line_still_works_with_a_hint(capsys, monkeypatch):
    code, err, seen = _cli(["--api-key", "sk-arg"], capsys, monkeypatch)
    assert code == 0 and seen["cfg"].api_key == "sk-arg"
    assert "--api-key on the command line is visible to other users" in err


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--api-key-file", "/no/such/key"], ["--api-key-file", "/no/such/key", "not found"]),
        (["--api-key-file", "{empty}"], ["--api-key-file", "is empty"]),
        (["--api-key", "k", "--api-key-file", "{key}"], ["give one of"]),
        (["--chat-template", "/no/such.jinja"], ["--chat-template", "file not found"]),
    ],
)
def test_serve_option_mistakes_are_one_line(capsys, monkeypatch, tmp_path, args, fragments):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "key").write_text("k2")
    args = [a.format(empty=tmp_path / "empty", key=tmp_path / "key") for a in args]
    code, err, seen = _cli(args, capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err and "cfg" not in seen
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("host,warned", [("0.0.0.0", True), ("10.0.0.5", True), ("::1", False)])
def test_serve_warns_when_reachable_beyond_loopback_without_a_key(
    capsys, monkeypatch, host, warned
):
    code, err, _ = _cli(["--host", host], capsys, monkeypatch)
    assert code == 0
    assert ("WARNING: no API key" in err) == warned, err
    code, err, _ = _cli(["--host", host], capsys, monkeypatch, env={"INSTILL_API_KEY": "k"})
    assert "WARNING: no API key" not in err


# --- one request never fails another (issue 24, item 4) -----------------------------------------


def _held(sched, tokenizer):
    """A gate job holding the decode thread, so the jobs submitted next are admitted together;
    returns the event that opens it."""
    from instill.infer import GenParams

    opened = threading.Event()
    gate = _Gate(opened)
    _run(sched, tokenizer, MSG, GenParams(max_new_tokens=2), cancelled=gate)
    # held before the next jobs go in: taken with the gate, some could start before the rest
    assert gate.entered.wait(30)
    return opened


def _alone(server, tokenizer, msgs, params):
    from instill.infer import generate

    return generate(server.model, tokenizer, [msgs], params, batch_invariant=False)[0]


def test_a_seed_out_of_range_is_a_400_and_its_neighbour_is_answered(served, tokenizer):
    from instill.infer import GenParams

    base, server = served
    sched = server.scheduler
    queued = []
    submit = sched.submit
    sched.submit = lambda job: queued.append(job) or submit(job)
    headers = {"Authorization": f"Bearer {KEY}"}
    bodies = [
        {"messages": MSG, "max_tokens": 6, "temperature": 0.7, "seed": 2**64},
        {"messages": MSG, "max_tokens": 6},
    ]
    try:
        opened = _held(sched, tokenizer)
        with ThreadPoolExecutor(2) as pool:
            replies = [
                pool.submit(httpx.post, base + "/v1/chat/completions", json=b, headers=headers)
                for b in bodies
            ]
            assert _wait_until(lambda: len(queued) == 3 or replies[0].done(), 30)
            opened.set()
            bad, good = (r.result() for r in replies)
    finally:
        opened.set()
        del sched.submit
    assert (bad.status_code, good.status_code) == (400, 200), (bad.text, good.text)
    assert bad.json()["error"]["param"] == "seed"
    assert bad.json()["error"]["message"] == (
        "'seed' must be an integer in [-9223372036854775808, 9223372036854775807], got "
        "18446744073709551616"
    )
    want = _alone(server, tokenizer, MSG, GenParams(max_new_tokens=6))
    assert good.json()["choices"][0]["message"]["content"] == want.text


def test_a_row_whose_setup_fails_fails_alone_in_its_group(served, tokenizer, monkeypatch):
    from instill.infer import GenParams, sampling

    _, server = served
    sched = server.scheduler
    admit = sampling.Sampler.admit

    def admit_or_fail(self, slot, params, prompt, vocab):
        if params.max_new_tokens == 7:  # the one broken request
            raise RuntimeError("bad row")
        return admit(self, slot, params, prompt, vocab)

    monkeypatch.setattr(sampling.Sampler, "admit", admit_or_fail)
    convs = [[{"role": "user", "content": w}] for w in ("cats", "dogs", "fish")]  # one bucket
    params = [GenParams(max_new_tokens=9), GenParams(max_new_tokens=7), GenParams(5, 0.8, seed=3)]
    want = [_alone(server, tokenizer, c, p) for c, p in zip(convs, params, strict=True) if p.seed]
    opened = _held(sched, tokenizer)
    jobs = [_run(sched, tokenizer, c, p) for c, p in zip(convs, params, strict=True)]
    opened.set()
    assert all(j.done.wait(60) for j in jobs)
    assert jobs[1].error == "generation failed: bad row"
    assert jobs[0].error is None and jobs[2].error is None
    monkeypatch.undo()
    assert jobs[0].text == _alone(server, tokenizer, convs[0], params[0]).text
    assert len(jobs[0].ids) == 9
    assert jobs[2].text == want[0].text and len(jobs[2].ids) == 5


def test_a_row_whose_text_callback_raises_fails_alone(served, tokenizer):
    from instill.infer import GenParams

    _, server = served
    sched = server.scheduler

    def broken(text):
        raise RuntimeError("client callback broke")

    opened = _held(sched, tokenizer)
    bad = _run(sched, tokenizer, MSG, GenParams(max_new_tokens=8), on_text=broken)
    good = _run(sched, tokenizer, MSG, GenParams(max_new_tokens=8), on_text=lambda t: None)
    opened.set()
    assert bad.done.wait(60) and good.done.wait(60)
    assert bad.error == "generation failed: client callback broke"
    assert good.error is None
    assert good.text == _alone(server, tokenizer, MSG, GenParams(max_new_tokens=8)).text


def test_a_prompt_that_breaks_the_prefill_fails_alone_in_its_group(served, tokenizer):
    from instill.infer import GenParams
    from instill.serve.scheduler import Job

    _, server = served
    sched = server.scheduler
    ids = [1, 2, 3]
    opened = _held(sched, tokenizer)
    bad = sched.submit(Job([*ids, len(tokenizer) + 5], GenParams(max_new_tokens=3)))
    good = sched.submit(Job([*ids, 4], GenParams(max_new_tokens=3)))
    opened.set()
    assert bad.done.wait(60) and good.done.wait(60)
    assert "generation failed" in bad.error
    assert good.error is None and len(good.ids) == 3


def test_null_means_absent_and_newer_names_are_read(served, tokenizer):
    """`"temperature": null` is greedy, as no temperature is (it was a temperature of 1);
    max_completion_tokens, OpenAI's newer name, is max_tokens."""
    from instill.infer import GenParams

    base, server = served
    headers = {"Authorization": f"Bearer {KEY}"}
    want = _alone(server, tokenizer, MSG, GenParams(max_new_tokens=7)).text
    nulls = {k: None for k in ("temperature", "top_p", "seed", "stop", "n", "stream", "user")}
    for body in (
        {"messages": MSG, "max_tokens": 7, **nulls},
        {"messages": MSG, "max_completion_tokens": 7, "stream_options": None},
    ):
        for _ in range(2):  # a temperature of 1 would not give the greedy reply twice
            r = httpx.post(base + "/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
            assert r.json()["usage"]["completion_tokens"] == 7


def test_a_deeply_nested_body_is_a_400_that_says_so(served):
    base, _ = served
    r = httpx.post(
        base + "/v1/completions",
        content=b'{"prompt": "x", "logit_bias": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "request body nests arrays or objects too deeply"


# --- start-up refusals (issue 24, item 5) --------------------------------------------------------


@pytest.mark.parametrize(
    "args,env,line",
    [
        (
            ["--api-key", ""],
            {},
            "error: --api-key: the API key is empty, which would turn authentication off; give "
            "a key, or set none to serve without one",
        ),
        (
            [],
            {"INSTILL_API_KEY": ""},
            "error: INSTILL_API_KEY is set but empty, which would turn authentication off; set "
            "a key, or unset INSTILL_API_KEY to serve without one",
        ),
        (
            [],
            {"INSTILL_API_KEY": "  "},
            "error: INSTILL_API_KEY: the API key is empty, which would turn authentication off; "
            "give a key, or set none to serve without one",
        ),
        (["--api-key-file", "{blank}"], {}, "error: --api-key-file: {blank} is empty"),
        (["--max-batch", "0"], {}, "error: --max-batch 0: must be at least 1"),
        (["--max-batch", "-3"], {}, "error: --max-batch -3: must be at least 1"),
        (["--max-concurrent", "0"], {}, "error: --max-concurrent 0: must be at least 1"),
        (["--max-tokens-cap", "0"], {}, "error: --max-tokens-cap 0: must be at least 1"),
    ],
)
def test_serve_refuses_an_empty_key_and_no_batch_before_loading(
    capsys, monkeypatch, tmp_path, args, env, line
):
    (tmp_path / "blank").write_text("   \n  \n")
    args = [a.format(blank=tmp_path / "blank") for a in args]
    code, err, seen = _cli(args, capsys, monkeypatch, env=env)
    assert code == 2 and "Traceback" not in err and "cfg" not in seen
    said = " ".join(err.split())  # a hint about keys in ps may come first
    assert said.endswith(line.format(blank=tmp_path / "blank")) and said.count("error:") == 1


def test_serve_config_refuses_what_cannot_serve():
    from pydantic import ValidationError

    for bad in ({"max_batch": 0}, {"max_concurrent": -1}, {"api_key": ""}, {"api_key": " \t"}):
        with pytest.raises(ValidationError):
            ServeConfig(**bad)
    assert ServeConfig(api_key=" k ").api_key == " k "  # a key is used as given


def _long_head(tokenizer, words: int):
    """The tokenizer with a template whose fixed head (a system turn) is `words` words long."""
    import copy

    t = copy.deepcopy(tokenizer)
    t.chat_template = (
        "<|im_start|>system\n" + "fixed words " * words + "<|im_end|>\n"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n"
    )
    return t


def test_a_template_head_longer_than_the_first_cache_is_served(tokenizer):
    """The engine's cache starts at 256 columns; a longer head was prefilled before the cache
    grew for the request, so every chat request failed (and the head was tried again)."""
    from conftest import build_tiny

    from instill.data.render import render_prompt
    from instill.infer import GenParams
    from instill.infer.engine import _template_head

    long = _long_head(tokenizer, 200)
    assert 300 < len(_template_head(long)) < 1000
    base, server, stop = start(build_tiny(tokenizer), long, ServeConfig())
    try:
        for _ in range(2):
            r = httpx.post(base + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 5})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == len(render_prompt(long, MSG))
            want = _alone(server, long, MSG, GenParams(max_new_tokens=5))
            assert r.json()["choices"][0]["message"]["content"] == want.text
    finally:
        stop()


def test_a_template_head_over_the_context_is_refused_at_start(tokenizer):
    from conftest import build_tiny

    from instill.errors import InstillError
    from instill.infer.engine import _template_head

    long = _long_head(tokenizer, 600)
    head = len(_template_head(long))
    with pytest.raises(InstillError) as err:
        Server(build_tiny(tokenizer), long, ["tiny"], ServeConfig())
    assert str(err.value) == (
        f"the chat template's fixed head is {head} tokens (a one-letter user message renders "
        f"to {head + 6}): with one token of reply that is over the context of 1024 tokens, so "
        "every chat request would be refused; give a shorter template with --chat-template FILE"
    )
