"""The web chat page in headless Chromium (Debian's `chromium`), driven over the DevTools
protocol: type a message with an API key set, see a streamed reply, save a screenshot."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from instill.serve import ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"


class Page:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        mid = next(self.ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                return msg.get("result", {})

    def js(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get(
            "value"
        )

    def wait(self, expr: str, seconds: float = 30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.js(expr):
                return
            time.sleep(0.05)
        raise AssertionError(f"page never satisfied: {expr}")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    port_file = tmp_path / "profile" / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
        time.sleep(0.1)
    yield int(port_file.read_text().split()[0])
    proc.terminate()
    proc.wait(10)


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
        page.js("document.getElementById('key').value = 'k-123';"
                "document.getElementById('key').dispatchEvent(new Event('change'))")
        page.js("document.getElementById('input').value = 'Hello there';"
                "document.getElementById('send').click()")
        page.wait("document.querySelectorAll('.msg.assistant').length === 1 && "
                  "document.querySelector('.msg.assistant').textContent.length > 0")
        page.wait("document.querySelector('.msg.error') === null && "
                  "document.querySelector('.msg.assistant').textContent.length > 20")
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
