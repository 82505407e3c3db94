"""Load test for `instill serve`: the server on loopback with the real model, N concurrent
streaming clients, and single-stream decode speed beside plain transformers `generate`.

    python bench/serve_load.py                       # N = 1,4,8,16, 64 new tokens each
    python bench/serve_load.py --clients 1,2 --requests 1 --max-tokens 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import uvicorn

from instill.data.render import end_of_turn_ids, render_prompt
from instill.serve import ServeConfig, build_app, load_server

TOPICS = ["the sea", "bread", "trains", "winter", "a small dog", "chess", "rain", "volcanoes"]


def start(model: str, max_batch: int):
    server = load_server(model, ServeConfig(max_batch=max_batch, max_concurrent=256))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(server), port=port, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}", uv


def one_request(base: str, i: int, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": tokens}


def load(base: str, clients: int, per_client: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(
            pool.map(lambda i: one_request(base, i, max_tokens), range(clients * per_client))
        )
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    return {
        "clients": clients,
        "requests_s": len(results) / wall,
        "output_tokens_s": sum(r["tokens"] for r in results) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        "ttft_p50_s": statistics.median(r["ttft"] for r in results),
    }


@torch.inference_mode()
def plain_generate_tokens_s(server, max_tokens: int) -> float:
    """Single-stream decode with plain transformers generate on the same loaded model."""
    tok, model = server.tokenizer, server.model
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "Write about bread."}])])
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        eos_token_id=end_of_turn_ids(tok),
        pad_token_id=tok.pad_token_id,
    )
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    server, base, uv = start(args.model, args.max_batch)
    one_request(base, 0, 4)  # warm-up
    print(f"{'N':>3} {'req/s':>7} {'out tok/s':>10} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9}")
    for n in [int(x) for x in args.clients.split(",")]:
        r = load(base, n, args.requests, args.max_tokens)
        print(
            f"{n:>3} {r['requests_s']:>7.2f} {r['output_tokens_s']:>10.1f} {r['p50_s']:>7.2f} "
            f"{r['p95_s']:>7.2f} {r['ttft_p50_s']:>9.3f}",
            flush=True,
        )
    single = one_request(base, 1, args.max_tokens)
    served = single["tokens"] / max(single["latency"] - single["ttft"], 1e-9)
    plain = plain_generate_tokens_s(server, args.max_tokens)
    print(
        f"single-stream decode tok/s: instill serve {served:.1f} | transformers generate "
        f"{plain:.1f} (serve figure excludes time to first token; a random or early-stopping "
        "reply can be shorter than --max-tokens)"
    )
    uv.should_exit = True
    server.scheduler.close()


if __name__ == "__main__":
    main()
