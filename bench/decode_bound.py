"""Batched generation against the matrix products alone: how close the engine comes, on the
quickstart's built-in suite, to what the model's weight products at the same shapes allow on
this machine, and where the rest of the time goes.

    python bench/decode_bound.py                                  # default model, batch 64
    python bench/decode_bound.py --model runs/quickstart/final --batch-size 32

1. The engine (infer/engine.py) answers the 208 held-out built-in prompts (8 per family, seed 0,
   `tables` held out, 32 new tokens) greedily at --batch-size rows. Every model call is recorded
   (its token rows and the rows that reach the output head) and timed.
2. The same calls' weight products alone: for each recorded shape, every nn.Linear of the model
   (q, k, v, o, gate, up, down in each layer, and the output head on the rows the engine keeps)
   run as F.linear on a random input of that shape, timed (median of --repeats). Their sum over
   the recorded calls is the time the matrix products alone need for the same work, and output
   tokens over that time the bound.
3. The gap, split: inside model calls but not weight products (attention, norms, rotary,
   elementwise, the framework's own dispatch), and outside model calls (sampling, end checks,
   admission, cache moves). With --profile, torch.profiler's top operators of one more run.

A number is this machine's at this load: run it alone (the load is printed beside it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F

from instill.data.render import render_prompt
from instill.infer.engine import Engine, GenParams, Job


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _linears(model) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The weights of every body nn.Linear, and the output head's."""
    head = model.get_output_embeddings().weight
    body = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.weight is not head
    ]
    return body, head


class Recorder:
    """Wraps Engine._forward: each call's (token rows, head rows) and its wall time."""

    def __init__(self):
        self.calls: list[tuple[int, int, float]] = []

    def wrap(self, engine: Engine) -> None:
        inner = engine._forward

        def timed(ids, positions, mask, keep):
            t0 = time.perf_counter()
            out = inner(ids, positions, mask, keep)
            head_rows = ids.shape[0] * (1 if isinstance(keep, int) else len(keep))
            self.calls.append((ids.numel(), head_rows, time.perf_counter() - t0))
            return out

        engine._forward = timed


@torch.inference_mode()
def _time_products(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Median seconds of F.linear over every weight at `rows` input rows."""
    dtype = weights[0].dtype
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype) for w in weights}
    for w in weights:  # warm the kernels and caches
        F.linear(inputs[w.shape[1]], w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_engine(model, tokenizer, prompts, max_new: int, batch: int):
    jobs = [Job(p, GenParams(max_new_tokens=max_new), live=False) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=batch)
    rec = Recorder()
    rec.wrap(engine)
    t0 = time.perf_counter()
    engine.run(jobs)
    wall = time.perf_counter() - t0
    tokens = sum(len(j.ids) for j in jobs)
    return wall, tokens, rec.calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import transformers

    from instill.eval.tasks import builtin_task
    from instill.models import load_for_inference

    transformers.logging.set_verbosity_error()
    loaded = load_for_inference(args.model)
    model, tok = loaded.model, loaded.tokenizer
    task = builtin_task(8, 0, None, holdout=["tables"])
    prompts = [render_prompt(tok, list(e.prompt)) for e in task.examples]
    print(
        f"{args.model}: {len(prompts)} built-in prompts, {args.max_new_tokens} new tokens, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, {_load()}"
    )
    run_engine(model, tok, prompts[:8], args.max_new_tokens, args.batch_size)  # warm-up
    wall, tokens, calls = run_engine(model, tok, prompts, args.max_new_tokens, args.batch_size)
    in_model = sum(c[2] for c in calls)
    body, head = _linears(model)
    shapes = Counter((c[0], c[1]) for c in calls)
    cost: dict[int, float] = {}
    products = 0.0
    for (rows, head_rows), n in shapes.items():
        for w, r in ((body, rows), ([head], head_rows)):
            key = (id(w[0]), r)
            if key not in cost:
                cost[key] = _time_products(w, r, args.repeats)
            products += n * cost[key]
    decode = [c for c in calls if c[0] == c[1]]  # one token a row, every row to the head
    print(f"  engine: {wall:.2f} s, {tokens} output tokens, {tokens / wall:.1f} tokens/s")
    print(
        f"  model calls: {len(calls)} ({len(decode)} decode steps, "
        f"{len(calls) - len(decode)} prefills), {in_model:.2f} s"
    )
    print(
        f"  weight products alone at the same shapes: {products:.2f} s -> bound "
        f"{tokens / products:.1f} tokens/s; the engine reaches {products / wall:.0%} of it"
    )
    print(
        f"  the gap {wall - products:.2f} s: in model calls but not weight products "
        f"{in_model - products:.2f} s ({(in_model - products) / wall:.0%} of the wall), "
        f"outside model calls {wall - in_model:.2f} s ({(wall - in_model) / wall:.0%})"
    )
    if decode:
        rows = Counter(c[0] for c in decode).most_common(1)[0][0]
        step = statistics.median(c[2] for c in decode if c[0] == rows)
        alone = cost[(id(body[0]), rows)] + cost[(id(head), rows)]
        print(
            f"  a decode step at {rows} rows: {1000 * step:.1f} ms in the model, "
            f"{1000 * alone:.1f} ms of it weight products ({alone / step:.0%})"
        )
    print(f"  {_load()}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_engine(model, tok, prompts, args.max_new_tokens, args.batch_size)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
