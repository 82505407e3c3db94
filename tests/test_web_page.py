"""The web chat page in headless Chromium (Debian's `chromium`), driven over the DevTools
protocol: type a message with an API key set, see a streamed reply, save a screenshot; the
system prompt and sampling settings as the server receives them, Stop (the server stops
generating), New chat, replies as Markdown with their HTML escaped, token counts and speed."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import httpx
from cdp import ARTIFACTS, Page, browser_fixture  # noqa: F401  (the `browser` fixture)

from instill.serve import ServeConfig


def test_chat_page_streams_a_reply(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    # untied: a reply of words (the tied model's newlines render as no Markdown text)
    base, server, stop = start(
        build_tiny(tokenizer, tied=False), tokenizer, ServeConfig(api_key="k-123")
    )
    try:
        targets = httpx.get(f"http://127.0.0.1:{browser}/json/list").json()
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Page.navigate", url=base + "/")
        page.wait("document.readyState === 'complete' && !!document.getElementById('send')")
        page.js(
            "document.getElementById('key').value = 'k-123';"
            "document.getElementById('key').dispatchEvent(new Event('change'))"
        )
        page.js(
            "document.getElementById('input').value = 'Hello there';"
            "document.getElementById('send').click()"
        )
        page.wait(
            "document.querySelectorAll('.msg.assistant').length === 1 && "
            "document.querySelector('.msg.assistant').textContent.length > 0"
        )
        _replied(page, 1)  # the whole reply and its stats line, in the screenshot
        assert len(page.js("document.querySelector('.msg.assistant').textContent")) > 20
        reply = page.js("document.querySelector('.msg.assistant').textContent")
        assert page.js("document.querySelector('.msg.user').textContent") == "Hello there"
        page.js("document.getElementById('log').scrollTop = 0")  # the user's turn in the shot
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "web_chat.png"
        shot.write_bytes(base64.b64decode(page.call("Page.captureScreenshot")["data"]))
        print(f"screenshot: {shot}")
        assert reply and page.js("localStorage.getItem('instill-key')") == "k-123"
        page.js("document.getElementById('new').click()")
        assert page.js("document.querySelectorAll('.msg').length") == 0
        page.ws.close()
    finally:
        stop()


def _open(browser, base):
    targets = httpx.get(f"http://127.0.0.1:{browser}/json/list").json()
    page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
    page.call("Page.enable")
    page.call("Page.navigate", url=base + "/")
    page.wait("document.readyState === 'complete' && !!document.getElementById('send')")
    return page


def _send(page, text):
    page.js(
        f"document.getElementById('input').value = {text!r};document.getElementById('send').click()"
    )


def test_chat_page_asks_for_no_more_than_the_servers_max_tokens_cap(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(max_tokens_cap=16))
    jobs = []
    submit = server.scheduler.submit
    server.scheduler.submit = lambda job: jobs.append(job) or submit(job)
    try:
        page = _open(browser, base)
        _send(page, "Hello there")
        _replied(page, 1)
        assert len(jobs) == 1 and jobs[0].params.max_new_tokens == 16
        page.ws.close()
    finally:
        stop()


def test_chat_page_shows_a_failed_generation(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig())

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    server.scheduler._forward = boom
    try:
        page = _open(browser, base)
        _send(page, "Hello there")
        page.wait("document.querySelector('.msg.error') !== null")
        assert page.js("document.querySelector('.msg.error').textContent") == (
            "error: generation failed: boom"
        )
        assert page.js("document.querySelectorAll('.msg').length") == 2  # user turn kept
        page.ws.close()
    finally:
        stop()


def _recording(server):
    """The jobs the scheduler is given and the conversations the server renders, in order."""
    jobs, conversations = [], []
    submit, chat_ids = server.scheduler.submit, server.chat_ids
    server.scheduler.submit = lambda job: jobs.append(job) or submit(job)
    server.chat_ids = lambda messages: conversations.append(messages) or chat_ids(messages)
    return jobs, conversations


def _replied(page, n):
    """Wait until the page has finished n replies (each ends with its stats line)."""
    page.wait(
        f"document.querySelectorAll('.stats').length === {n} || "
        "document.querySelector('.msg.error') !== null"
    )
    assert page.js("document.querySelector('.msg.error')") is None


MARKDOWN = [
    ("Hello", "<p>Hello</p>"),
    ("a\nb\n\nc", "<p>a<br>b</p><p>c</p>"),
    (
        "**b** *i* _u_ `x*y*`",
        "<p><strong>b</strong> <em>i</em> <em>u</em> <code>x*y*</code></p>",
    ),
    ("- one\n- two\n1. a\n2. b", "<ul><li>one</li><li>two</li></ul><ol><li>a</li><li>b</li></ol>"),
    (
        "```py\nif a < b:\n  x = '**'\n```\nafter",
        "<pre><code>if a &lt; b:\n  x = &#39;**&#39;</code></pre><p>after</p>",
    ),
    ("```\ncode <b>", "<pre><code>code &lt;b&gt;</code></pre>"),  # a block still streaming
    ("# Title", "<p><strong>Title</strong></p>"),
    ("2 * 3 * 4 and snake_case_name", "<p>2 * 3 * 4 and snake_case_name</p>"),
    (
        "<img src=x onerror=alert(1)><script>alert(2)</script>",
        "<p>&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;</p>",
    ),
    ("**\"q\" & 'a'**", "<p><strong>&quot;q&quot; &amp; &#39;a&#39;</strong></p>"),
    ('`<b onclick="x">`', "<p><code>&lt;b onclick=&quot;x&quot;&gt;</code></p>"),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
]


def test_the_markdown_renderer_escapes_then_formats(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig())
    try:
        page = _open(browser, base)
        for source, expected in MARKDOWN:
            assert page.js(f"markdown({json.dumps(source)})") == expected, source
        page.ws.close()
    finally:
        stop()


INJECTION = (
    "Here is **bold**, *it* and `<b>code</b>`.\n"
    '<img src=x onerror="window.pwned=1">\n'
    "<script>window.pwned=2</script>\n\n"
    "- item <i>one</i>\n"
    "- [x](javascript:window.pwned=3)\n\n"
    '```"><img src=x onerror=window.pwned=4>\n'
    "<script>window.pwned=5</script>\n"
    "```"
)


def test_a_reply_with_html_in_it_shows_as_text_and_runs_nothing(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig())

    def reply_with_markup(job):  # the model's part: this text, streamed in pieces of 7 chars
        def run():
            for i in range(0, len(INJECTION), 7):
                job.on_text(INJECTION[i : i + 7])
                job.ids.append(1)
            job.text, job.finish_reason = INJECTION, "stop"
            job.done.set()

        threading.Thread(target=run, daemon=True).start()
        return job

    server.scheduler.submit = reply_with_markup
    try:
        page = _open(browser, base)
        _send(page, "Show me some HTML")
        _replied(page, 1)
        time.sleep(0.5)  # an injected onerror handler would have run by now
        assert page.js("window.pwned") is None
        assert (
            page.js("document.querySelectorAll('#log img, #log script, #log i, #log a').length")
            == 0
        )
        shown = page.js("document.querySelector('.msg.assistant').textContent")
        for text in ('<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>"):
            assert text in shown
        assert page.js("document.querySelector('.msg.assistant strong').textContent") == "bold"
        assert page.js("document.querySelector('.msg.assistant em').textContent") == "it"
        assert page.js("document.querySelector('.msg.assistant code').textContent") == "<b>code</b>"
        assert page.js("[...document.querySelectorAll('li')].map(e => e.textContent)") == [
            "item <i>one</i>",
            "[x](javascript:window.pwned=3)",
        ]
        assert page.js("document.querySelector('pre').textContent") == (
            "<script>window.pwned=5</script>"
        )
        page.ws.close()
    finally:
        stop()


def test_the_page_is_sent_with_a_policy_that_lets_only_its_own_script_and_style_run(
    browser, tokenizer
):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig())
    try:
        policy = httpx.get(base + "/").headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
        assert "unsafe-inline" not in policy and "connect-src 'self'" in policy
        page = _open(browser, base)  # its script ran (it found #send), so the hash matches
        assert page.js("getComputedStyle(document.body).maxWidth") == "820px"  # style too
        page.ws.close()
    finally:
        stop()


def test_the_system_prompt_and_sampling_settings_reach_the_server(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    from instill.infer.engine import GenParams
    from instill.serve.requests import ChatBody

    cfg = ServeConfig(max_tokens_cap=64)
    base, server, stop = start(build_tiny(tokenizer, tied=False), tokenizer, cfg)
    jobs, conversations = _recording(server)
    try:
        page = _open(browser, base)
        shown = {
            name: page.js(f"document.getElementById('{name}').value")
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "repetition_penalty",
                "max_tokens",
                "seed",
            )
        }
        assert shown == {
            "temperature": "0",
            "top_p": "1",
            "top_k": "0",
            "repetition_penalty": "1",
            "max_tokens": "64",  # 256, or the server's cap when lower
            "seed": "",
        }
        _send(page, "Hello there")
        _replied(page, 1)
        # the page's defaults are the API's: the same as a request that names none
        bare = ChatBody.model_validate({"messages": [{"role": "user", "content": "x"}]})
        assert jobs[0].params == bare.gen_params(cfg)
        assert conversations[0] == [{"role": "user", "content": "Hello there"}]

        page.js("document.getElementById('new').click()")
        settings = {
            "system": "You are terse.",
            "temperature": "0.7",
            "top_p": "0.9",
            "top_k": "40",
            "repetition_penalty": "1.1",
            "max_tokens": "8",
            "seed": "7",
        }
        for name, value in settings.items():
            page.js(
                f"document.getElementById('{name}').value = {value!r};"
                f"document.getElementById('{name}').dispatchEvent(new Event('change'))"
            )
        _send(page, "Hi")
        _replied(page, 1)
        assert conversations[1] == [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
        ]
        assert jobs[1].params == GenParams(
            max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=7
        )
        page.call("Page.reload")  # the settings are kept in the browser
        page.wait("document.readyState === 'complete' && !!document.getElementById('send')")
        assert page.js("document.getElementById('system').value") == "You are terse."
        assert page.js("document.getElementById('seed').value") == "7"
        page.js("document.getElementById('defaults').click()")
        assert page.js("document.getElementById('temperature').value") == "0"
        assert page.js("document.getElementById('system').value") == ""
        page.ws.close()
    finally:
        stop()


def test_each_reply_shows_its_token_counts_and_speed(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer, tied=False), tokenizer, ServeConfig())
    jobs, _ = _recording(server)
    try:
        page = _open(browser, base)
        page.js("document.getElementById('max_tokens').value = '12'")
        _send(page, "Hello there")
        _replied(page, 1)
        line = page.js("document.querySelector('.stats').textContent")
        counts = f"{len(jobs[0].ids)} tokens (prompt {len(jobs[0].prompt)}; counts from the server)"
        assert re.fullmatch(
            re.escape(counts) + r" · \d+\.\d tokens/s · first token after \d+\.\d\d s", line
        ), line
        page.ws.close()
    finally:
        stop()


def test_new_chat_forgets_the_conversation(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer, tied=False), tokenizer, ServeConfig())
    jobs, conversations = _recording(server)
    try:
        page = _open(browser, base)
        page.js("document.getElementById('max_tokens').value = '6'")
        _send(page, "First")
        _replied(page, 1)
        _send(page, "Second")
        _replied(page, 2)
        assert conversations[1] == [
            {"role": "user", "content": "First"},
            {"role": "assistant", "content": jobs[0].text},
            {"role": "user", "content": "Second"},
        ]
        page.js("document.getElementById('new').click()")
        assert page.js("document.getElementById('log').children.length") == 0
        _send(page, "Third")
        _replied(page, 1)
        assert conversations[2] == [{"role": "user", "content": "Third"}]
        page.ws.close()
    finally:
        stop()


def _slowed(server, seconds: float = 0.02):
    """Each decode step takes at least `seconds`, so a long reply is still running when the
    test clicks Stop."""
    step = server.scheduler._step

    def slow_step():
        time.sleep(seconds)
        step()

    server.scheduler._step = slow_step


def test_stop_ends_the_reply_and_the_server_stops_generating_it(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    cfg = ServeConfig(max_concurrent=1, max_tokens_cap=900)
    base, server, stop = start(build_tiny(tokenizer, tied=False), tokenizer, cfg)
    jobs, conversations = _recording(server)
    _slowed(server)
    try:
        page = _open(browser, base)
        assert page.js("document.getElementById('stop').disabled") is True
        page.js("document.getElementById('max_tokens').value = '900'")
        _send(page, "Tell me a long story")
        page.wait("document.querySelector('.msg.assistant').textContent.length > 0")
        assert page.js("document.getElementById('send').disabled") is True
        page.js("document.getElementById('stop').click()")
        assert jobs[0].done.wait(10)  # 900 tokens at 20 ms a step would take 18 s
        assert jobs[0].cancelled.is_set() and len(jobs[0].ids) < 900
        made = len(jobs[0].ids)
        time.sleep(0.2)
        assert len(jobs[0].ids) == made  # nothing more was generated
        deadline = time.monotonic() + 10
        while server.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.active == 0  # its slot is free (max_concurrent=1: the next request fits)
        page.wait("document.querySelectorAll('.stats').length === 1")
        line = page.js("document.querySelector('.stats').textContent")
        shown = int(re.match(r"stopped · (\d+) tokens \(stream chunks counted\)", line)[1])
        assert 1 <= shown <= made
        assert page.js("document.getElementById('stop').disabled") is True
        assert page.js("document.getElementById('send').disabled") is False
        page.js("document.getElementById('max_tokens').value = '4'")
        _send(page, "Go on")  # the stopped reply stays in the conversation
        _replied(page, 2)
        first, kept = conversations[1][:2]
        assert first == {"role": "user", "content": "Tell me a long story"}
        assert kept["role"] == "assistant" and kept["content"].strip()
        assert tokenizer.decode(jobs[0].ids, skip_special_tokens=True).startswith(kept["content"])
        page.ws.close()
    finally:
        stop()


def test_new_chat_during_a_reply_stops_it(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    cfg = ServeConfig(max_tokens_cap=900)
    base, server, stop = start(build_tiny(tokenizer, tied=False), tokenizer, cfg)
    jobs, _ = _recording(server)
    _slowed(server)
    try:
        page = _open(browser, base)
        page.js("document.getElementById('max_tokens').value = '900'")
        _send(page, "Tell me a long story")
        page.wait("document.querySelector('.msg.assistant').textContent.length > 0")
        page.js("document.getElementById('new').click()")
        assert jobs[0].done.wait(10) and jobs[0].cancelled.is_set() and len(jobs[0].ids) < 900
        page.wait("document.getElementById('send').disabled === false")
        assert page.js("document.getElementById('log').children.length") == 0
        page.ws.close()
    finally:
        stop()


def test_a_seed_beyond_javascripts_safe_integers_reaches_the_server_exactly(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer, tied=False), tokenizer, ServeConfig())
    jobs, _ = _recording(server)
    try:
        page = _open(browser, base)
        seed = 2**62 + 1  # a JavaScript number would round it to 2**62
        page.js(f"document.getElementById('seed').value = '{seed}';")
        page.js("document.getElementById('max_tokens').value = '2'")
        _send(page, "Hello")
        _replied(page, 1)
        assert jobs[0].params.seed == seed
        page.ws.close()
    finally:
        stop()


def test_a_setting_out_of_range_shows_the_servers_reason(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig())
    try:
        page = _open(browser, base)
        page.js("document.getElementById('temperature').value = '3'")
        _send(page, "Hello")
        page.wait("document.querySelector('.msg.error') !== null")
        assert page.js("document.querySelector('.msg.error').textContent") == (
            "error: 'temperature' must be a number in [0, 2], got 3.0"
        )
        assert page.js("document.getElementById('send').disabled") is False
        page.ws.close()
    finally:
        stop()
