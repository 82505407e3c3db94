"""The web chat page in headless Chromium (Debian's `chromium`), driven over the DevTools
protocol: type a message with an API key set, see a streamed reply, save a screenshot."""

from __future__ import annotations

import base64

import httpx
from cdp import ARTIFACTS, Page, browser_fixture  # noqa: F401  (the `browser` fixture)

from instill.serve import ServeConfig


def test_chat_page_streams_a_reply(browser, tokenizer):
    from conftest import build_tiny
    from test_serve import start

    base, server, stop = start(build_tiny(tokenizer), tokenizer, ServeConfig(api_key="k-123"))
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
        page.wait(
            "document.querySelector('.msg.error') === null && "
            "document.querySelector('.msg.assistant').textContent.length > 20"
        )
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
        page.wait(
            "document.querySelector('.msg.error') !== null || "
            "document.querySelector('.msg.assistant').textContent.length > 0"
        )
        assert page.js("document.querySelector('.msg.error')") is None
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
