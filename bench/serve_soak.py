"""Soak test for `instill serve`: the real command in a subprocess, N concurrent clients for a
while, every kind of request a server meets, then the counts.

    python bench/serve_soak.py                      # a tiny random Llama, 16 clients, 120 s
    python bench/serve_soak.py --model runs/quickstart/final --duration 600
    python bench/serve_soak.py --duration 10        # smoke test

Each client loops over a weighted mix: chat and completion requests, streaming and not; clients
that hang up mid-stream or while waiting for a whole reply; bad JSON, a wrong Content-Type, bad
parameters, a wrong API key, a foreign Host header; bodies over the limit, declared and chunked.
Every answer is checked against the status its kind should get. Printed: requests served, answers
by kind and status, 5xx (must be 0), answers that were not the expected status, tracebacks in the
server's log, in-flight requests left after the run (must be 0), and the server's RSS before,
at peak and after. Exit status 1 when any of those is off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

KEY = "sk-soak"
TOPICS = ["the sea", "bread", "trains", "winter", "a small dog", "chess", "rain", "volcanoes"]
LIMIT = 1_000_000  # the server's default body limit (ServeConfig.max_body_bytes)


def tiny_model(folder: Path) -> Path:
    """A 2-layer, 64-dim Llama with the default model's tokenizer and template, random weights
    (the test suite's tiny model)."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from instill.config import ModelConfig
    from instill.models import load_tokenizer, resolve_model

    transformers.logging.disable_progress_bar()
    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct").path, ModelConfig())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = folder / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(rng: random.Random) -> list[dict]:
    topic = rng.choice(TOPICS)
    if rng.random() < 0.3:  # OpenAI's newer shape: developer role, list-form content
        return [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": f"Write about {topic}."}]},
        ]
    return [{"role": "user", "content": f"Write about {topic}."}]


class Client:
    """One client's connection and its loop over the mix; results go to the shared counters."""

    def __init__(self, base: str, port: int, seed: int, stats: Stats):
        self.base, self.port, self.rng, self.stats = base, port, random.Random(seed), stats
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        )

    def generation(self, stream: bool) -> dict:
        rng = self.rng
        body = {"max_tokens": rng.randint(1, 48), "stream": stream}
        if rng.random() < 0.5:
            body["temperature"], body["seed"] = 0.8, rng.randint(0, 10**6)
        if rng.random() < 0.2:
            body["stop"] = [".", "\n\n"]
        if rng.random() < 0.7:
            return {"messages": messages(rng), **body}
        return {"prompt": f"Once upon a time, {rng.choice(TOPICS)}", **body}

    def route(self, body: dict) -> str:
        return "/v1/chat/completions" if "messages" in body else "/v1/completions"

    def whole(self) -> tuple[str, int]:
        body = self.generation(stream=False)
        return "whole", self.http.post(self.route(body), json=body).status_code

    def streamed(self) -> tuple[str, int]:
        body = self.generation(stream=True)
        body["stream_options"] = {"include_usage": True}
        with self.http.stream("POST", self.route(body), json=body) as r:
            if r.status_code != 200:
                r.read()
                return "stream", r.status_code
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        if events[-1:] != ["[DONE]"] or any('"error"' in e for e in events):
            return "stream (bad ending)", 200
        return "stream", 200

    def hang_up_mid_stream(self) -> tuple[str, int]:
        body = {"messages": messages(self.rng), "max_tokens": 600, "stream": True}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= self.rng.randint(1, 6):
                    break  # leaving the block closes the connection with the stream unread
            return "hang up mid-stream", r.status_code

    def hang_up_waiting(self) -> tuple[str, int]:
        body = {"messages": messages(self.rng), "max_tokens": 600}
        try:
            self.http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.1))
        except httpx.ReadTimeout:
            return "hang up waiting", 0  # 0: the client left before any answer
        return "hang up waiting (answered first)", 200

    def bad_json(self) -> tuple[str, int]:
        raw = self.rng.choice([b"{not json", b"[1, 2]", b"", b'{"messages": [', b"\xff\xfe"])
        r = self.http.post(
            "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
        )
        return "bad JSON", r.status_code

    def wrong_content_type(self) -> tuple[str, int]:
        kind = self.rng.choice(["text/plain", "application/x-www-form-urlencoded", None])
        headers = {"Content-Type": kind} if kind else {}
        body = json.dumps({"messages": messages(self.rng), "max_tokens": 2})
        r = self.http.post("/v1/chat/completions", content=body, headers=headers)
        return "wrong Content-Type", r.status_code

    BAD_PARAMS = [
        {"temperature": 5},
        {"max_tokens": -1},
        {"max_tokens": 10**6},
        {"top_p": 0},
        {"n": 3},
        {"seed": "x"},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": "x" * 1000},
        {"stream_options": [1]},
        {"messages": "hello"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": "word " * 1100}]},
        {"model": "../../etc/passwd"},
    ]

    def bad_params(self) -> tuple[str, int]:
        body = {"messages": messages(self.rng), "max_tokens": 2, **self.rng.choice(self.BAD_PARAMS)}
        return "bad params", self.http.post("/v1/chat/completions", json=body).status_code

    def wrong_key(self) -> tuple[str, int]:
        body = {"messages": messages(self.rng), "max_tokens": 2}
        r = self.http.post(
            "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}
        )
        return "wrong API key", r.status_code

    def foreign_host(self) -> tuple[str, int]:
        r = self.http.get("/v1/models", headers={"Host": "evil.example"})
        return "foreign Host", r.status_code

    def oversized(self) -> tuple[str, int]:
        text = "a" * (LIMIT + 1000)
        body = {"messages": [{"role": "user", "content": text}]}
        return "oversized", self.http.post("/v1/chat/completions", json=body).status_code

    def oversized_chunked(self) -> tuple[str, int]:
        """Chunks sent until the server answers; the answer must come near the limit."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            piece, sent, reply = b"[" * 65536, 0, b""
            while b"\r\n" not in reply and sent < 20 * LIMIT:
                try:
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                except OSError:
                    break
                sent += len(piece)
                if select.select([s], [], [], 0)[0]:
                    reply += s.recv(65536)
            s.settimeout(10)
            while b"\r\n" not in reply and (more := s.recv(65536)):
                reply += more
        if sent >= 20 * LIMIT:
            return "oversized chunked (read past the limit)", 0
        return "oversized chunked", int(reply.split(b" ", 2)[1])

    MIX = [  # (weight, action, the status it should get)
        (30, whole, 200),
        (30, streamed, 200),
        (6, hang_up_mid_stream, 200),
        (4, hang_up_waiting, 0),
        (5, bad_json, 400),
        (5, wrong_content_type, 415),
        (8, bad_params, None),  # 400, or 404 for the unknown model
        (3, wrong_key, 401),
        (3, foreign_host, 421),
        (2, oversized, 413),
        (2, oversized_chunked, 413),
    ]

    def run(self, deadline: float) -> None:
        weights = [w for w, _, _ in self.MIX]
        while time.monotonic() < deadline:
            _, action, want = self.rng.choices(self.MIX, weights)[0]
            try:
                kind, status = action(self)
            except (httpx.HTTPError, OSError) as exc:
                self.stats.add(f"{action.__name__}: {type(exc).__name__}", -1, expected=False)
                continue
            ok = status in ((400, 404) if want is None else (want,)) and "(" not in kind
            self.stats.add(kind, status, expected=ok)
        self.http.close()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.answers: Counter[tuple[str, int]] = Counter()
        self.unexpected: Counter[tuple[str, int]] = Counter()

    def add(self, kind: str, status: int, expected: bool) -> None:
        with self.lock:
            self.answers[kind, status] += 1
            if not expected:
                self.unexpected[kind, status] += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Model to serve (default: a tiny random Llama).")
    ap.add_argument("--duration", type=float, default=120, help="Seconds of load.")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="instill-soak-"))
    model = args.model or str(tiny_model(folder))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = folder / "server.log"
    env = {**os.environ, "INSTILL_API_KEY": KEY}
    cmd = [sys.executable, "-m", "instill", "serve", model, "--port", str(port)]
    with log.open("w") as sink:
        server = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                print(log.read_text())
                raise SystemExit("the server did not start")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        warm = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        httpx.post(
            base + "/v1/chat/completions", json=warm, headers={"Authorization": f"Bearer {KEY}"}
        )
        rss_before, peak = rss_mib(server.pid), 0.0
        stats = Stats()
        stop_at = time.monotonic() + args.duration
        clients = [Client(base, port, args.seed * 1000 + i, stats) for i in range(args.clients)]
        threads = [threading.Thread(target=c.run, args=(stop_at,)) for c in clients]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mib(server.pid))
            time.sleep(0.5)
        wall = time.monotonic() - t0
        active = None
        for _ in range(100):  # hung-up requests finish their current decode step first
            active = httpx.get(base + "/health").json()["active"]
            if active == 0:
                break
            time.sleep(0.1)
        rss_after = rss_mib(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    text = log.read_text()
    tracebacks = text.count("Traceback")

    total = sum(stats.answers.values())
    served = sum(stats.answers[kind, 200] for kind in ("whole", "stream"))
    fivexx = sum(n for (_, s), n in stats.answers.items() if 500 <= s < 600)
    unexpected = sum(stats.unexpected.values())
    print(f"{args.clients} clients for {wall:.0f} s against {model}")
    print(f"requests: {total} ({total / wall:.1f}/s); generations served: {served}")
    print(f"{'kind':42} {'status':>6} {'count':>7}")
    for (kind, status), n in sorted(stats.answers.items()):
        shown = {0: "-", -1: "error"}.get(status, str(status))
        print(f"{kind:42} {shown:>6} {n:>7}")
    print(f"5xx answers: {fivexx}")
    print(f"answers not of the expected status: {unexpected} {dict(stats.unexpected) or ''}")
    print(f"tracebacks in the server's log: {tracebacks}")
    print(f"requests in flight after the run: {active}")
    print(
        f"server RSS: {rss_before:.0f} MiB before, {peak:.0f} MiB peak, {rss_after:.0f} MiB after"
    )
    if tracebacks:
        print(text[-4000:])
    return 1 if fivexx or unexpected or tracebacks or active else 0


if __name__ == "__main__":
    sys.exit(main())
