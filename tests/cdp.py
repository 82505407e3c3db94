"""A minimal DevTools-protocol client for tests that drive Debian's headless `chromium`:
the `browser` fixture (yields the debugging port; a test module gets it by importing
`browser_fixture`) and `Page` (call a method, evaluate JavaScript, wait for a condition)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

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
                if "error" in msg:
                    raise AssertionError(f"{method} failed: {msg['error']}")
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


@pytest.fixture(name="browser")
def browser_fixture(tmp_path):
    """Headless Chromium with a fresh profile at 1000x700; yields its DevTools port. A test
    module gets it as `browser` by importing `browser_fixture` from here."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-port=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1000,700",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = tmp_path / "profile" / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None, "chromium did not start"
        time.sleep(0.1)
    yield int(port_file.read_text().split()[0])
    proc.terminate()
    proc.wait(10)
