"""Generation speed: instill's engine (infer/engine.py) against transformers' `generate` as
instill ran it before the engine (static left-padded batches sorted by prompt length: `hf_generate`
below is the old infer/generate.py), both in this one process, alternating, so both see the same
machine load.

    python bench/generation_engine.py                        # base model, 2 rounds
    python bench/generation_engine.py --tuned runs/quickstart/final --rounds 3
    python bench/generation_engine.py --suites builtin --rounds 1 --single-tokens 0   # quick

1. Evaluation throughput on the quickstart's generated suites: builtin (208 held-out prompts, 32
   new tokens) and general_gen (64 open prompts, 64 new tokens), eval.batch_size 32. Per suite and
   path: wall seconds and output tokens/s (the median round), and how many replies are the same
   tokens on both paths. (`general`, the quickstart's third suite, is scored by log-likelihood:
   no generation, the same code either way.)
2. Single-stream decode tokens/s on the default model: transformers generate; the engine one row
   unpadded, as chat and the server run it; the engine padded to 4 rows, as evaluation runs it.
   Decode only: a 1-token run's time is subtracted. Replies are forced to full length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from instill.data.render import end_of_turn_ids, render_prompt
from instill.infer.engine import Engine, GenParams, Job


@torch.inference_mode()
def hf_generate(model, tokenizer, prompts: list[list[int]], max_new: int, batch_size: int):
    """The old path: batches of prompts sorted by length, left-padded, transformers' greedy
    `generate` until every row of the batch has ended; returns each reply's token ids (up to and
    with the end-of-turn token)."""
    from transformers import GenerationConfig

    eot = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=eot, pad_token_id=pad
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attn[row, width - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in eot), None)
            replies[i] = new if cut is None else new[: cut + 1]
    return replies


def engine_generate(model, tokenizer, prompts, max_new: int, batch_size: int):
    jobs = [Job(p, GenParams(max_new_tokens=max_new), live=False) for p in prompts]
    Engine(model, tokenizer, max_batch=batch_size).run(jobs)
    return [j.ids + ([j.end_of_turn] if j.end_of_turn is not None else []) for j in jobs]


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def suites(tokenizer, names: list[str]) -> dict[str, tuple[list[list[int]], int]]:
    from instill.eval.tasks import builtin_task, general_gen_task

    found = {}
    if "builtin" in names:  # the quickstart's: 8 per family, seed 0
        task = builtin_task(8, 0, None, holdout=["tables"])
        found["builtin"] = ([render_prompt(tokenizer, list(e.prompt)) for e in task.examples], 32)
    if "general_gen" in names:  # general_gen_per_kind 8, eval.gen_max_new_tokens 64
        task = general_gen_task(8)
        found["general_gen"] = (
            [render_prompt(tokenizer, list(e.prompt)) for e in task.examples],
            64,
        )
    return found


def throughput(model, tokenizer, label: str, names: list[str], rounds: int, batch: int) -> None:
    print(
        f"\n{label}: evaluation throughput (batch {batch}, torch threads {torch.get_num_threads()})"
    )
    print(
        f"{'suite':<12} {'path':<24} {'prompts':>7} {'tokens':>7} {'wall s':>8} "
        f"{'tok/s':>7} {'speed-up':>8} {'same replies':>12}  load before -> after"
    )
    for name, (prompts, max_new) in suites(tokenizer, names).items():
        times: dict[str, list[float]] = {"transformers generate": [], "instill engine": []}
        replies, loads = {}, {}
        for r in range(rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for path in order:
                run = hf_generate if path == "transformers generate" else engine_generate
                before = _load()
                t0 = time.perf_counter()
                replies[path] = run(model, tokenizer, prompts, max_new, batch)
                times[path].append(time.perf_counter() - t0)
                loads.setdefault(path, []).append(f"{before} -> {_load()[5:]}")
        eot = set(end_of_turn_ids(tokenizer))
        a, b = replies["transformers generate"], replies["instill engine"]
        same = sum(x == y for x, y in zip(a, b, strict=True))
        base = statistics.median(times["transformers generate"])
        for path, ts in times.items():
            wall = statistics.median(ts)
            tokens = sum(sum(t not in eot for t in x) for x in replies[path])
            print(
                f"{name:<12} {path:<24} {len(prompts):>7} {tokens:>7} {wall:>8.1f} "
                f"{tokens / wall:>7.1f} {base / wall:>7.2f}x {same:>5}/{len(prompts):<6}  "
                f"{'; '.join(loads[path])}",
                flush=True,
            )


def single_stream(model, tokenizer, tokens: int, rounds: int) -> None:
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Write about bread."}])

    @torch.inference_mode()
    def hf(n):
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        return time.perf_counter() - t0

    def engine(row_block):
        def go(n):
            t0 = time.perf_counter()
            Engine(model, tokenizer, 1, eot=[], row_block=row_block).run(
                [Job(prompt, GenParams(max_new_tokens=n), live=False)]
            )
            return time.perf_counter() - t0

        return go

    paths = {
        "transformers generate": hf,
        "engine, 1 row (chat, serve)": engine(1),
        "engine, 4 rows (evaluation)": engine(4),
    }
    rates: dict[str, list[float]] = {k: [] for k in paths}
    before = _load()
    for r in range(rounds):
        for name in paths if r % 2 == 0 else reversed(paths):
            full, one = paths[name](tokens), paths[name](1)
            rates[name].append((tokens - 1) / (full - one))
    print(
        f"\nsingle-stream decode, {tokens} tokens, torch threads {torch.get_num_threads()} "
        f"({before} -> {_load()[5:]})"
    )
    base = statistics.median(rates["transformers generate"])
    for name, rs in rates.items():
        med = statistics.median(rs)
        print(
            f"  {name:<28} {med:>6.1f} tok/s  {med / base:>5.2f}x   rounds: "
            f"{', '.join(f'{x:.1f}' for x in rs)}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tuned", default=None, help="also a tuned run's final/ (or a model dir)")
    ap.add_argument("--suites", default="builtin,general_gen")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--single-tokens", type=int, default=64, help="0: skip single-stream")
    args = ap.parse_args()
    import transformers

    from instill.models import load_for_inference

    transformers.logging.set_verbosity_error()
    names = [s for s in args.suites.split(",") if s]
    loaded = load_for_inference(args.model)
    throughput(
        loaded.model, loaded.tokenizer, f"{args.model} (base)", names, args.rounds, args.batch_size
    )
    if args.single_tokens:
        single_stream(loaded.model, loaded.tokenizer, args.single_tokens, max(args.rounds, 3))
    if args.tuned:
        tuned = load_for_inference(args.tuned)
        throughput(
            tuned.model,
            tuned.tokenizer,
            f"{args.tuned} (tuned)",
            names,
            args.rounds,
            args.batch_size,
        )


if __name__ == "__main__":
    main()
