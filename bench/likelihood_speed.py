"""Choice scoring speed: the `general` suite (64 questions, 4 options each) on the default model,
scored row by row as before (every option's whole conversation, right-padded batches of 8: what
eval.batch_size 32 gave) against the shared-prefix scoring (eval/likelihood.py), alternating
old, new, old, new in this one process so both see the same machine load.

    OMP_NUM_THREADS=1 python bench/likelihood_speed.py             # 2 rounds
    OMP_NUM_THREADS=1 python bench/likelihood_speed.py --rounds 3 --tokens-per-pass 128,256,512

Prints each timing with the load average beside it, the median of each path and their ratio,
how many tokens each path runs through the model, and checks that both pick the same option for
every question (the largest score difference is printed too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from instill.config import ModelConfig
from instill.eval.likelihood import (
    TOKENS_PER_PASS,
    choice_rows,
    choose,
    masked_logprobs,
    per_byte_choice,
)
from instill.eval.tasks import general_task
from instill.models.load import load_model


def old_choose(model, tokenizer, prompts, choices, batch_size=8):
    """The scoring before the shared prefixes: every option's row in full, length-sorted padded
    batches (masked_logprobs), the same per-byte score."""
    rows = choice_rows(tokenizer, prompts, choices)
    scores = masked_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
    return per_byte_choice(scores, choices), sum(len(ids) for ids, _ in rows)


def tokens_run(model, tokenizer, prompts, choices, per_pass):
    """Tokens the shared path sends through the model (counted at the embedding)."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].numel())
    )
    try:
        choose(model, tokenizer, prompts, choices, tokens_per_pass=per_pass)
    finally:
        hook.remove()
    return sum(seen), len(seen)


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens-per-pass", default=str(TOKENS_PER_PASS), help="comma-separated")
    args = ap.parse_args()
    budgets = [int(b) for b in args.tokens_per_pass.split(",")]

    loaded = load_model(ModelConfig())
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    task = general_task()
    prompts = [list(ex.prompt) for ex in task.examples]
    choices = [list(ex.choices) for ex in task.examples]
    print(
        f"general: {len(prompts)} questions, {sum(map(len, choices))} options; "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cpus; {load()}"
    )

    old_s: list[float] = []
    new_s: dict[int, list[float]] = {b: [] for b in budgets}
    for r in range(args.rounds):
        t = time.perf_counter()
        old, old_tokens = old_choose(model, tokenizer, prompts, choices)
        old_s.append(time.perf_counter() - t)
        print(f"round {r + 1} old            {old_s[-1]:7.2f} s  ({load()})", flush=True)
        for b in budgets:
            t = time.perf_counter()
            new = choose(model, tokenizer, prompts, choices, tokens_per_pass=b)
            new_s[b].append(time.perf_counter() - t)
            print(
                f"round {r + 1} new {b:>4} tok/pass {new_s[b][-1]:7.2f} s  ({load()})", flush=True
            )
            same = sum(o[0] == n[0] for o, n in zip(old, new, strict=True))
            diff = max(
                abs(x - y)
                for o, n in zip(old, new, strict=True)
                for x, y in zip(o[1], n[1], strict=True)
            )
            if r == 0:
                print(f"  picks identical: {same}/{len(old)}; largest score difference {diff:.2e}")

    old_med = statistics.median(old_s)
    print(f"\nold: median {old_med:.2f} s, {old_tokens} tokens through the model")
    for b in budgets:
        med = statistics.median(new_s[b])
        tokens, passes = tokens_run(model, tokenizer, prompts, choices, b)
        paired = statistics.median(o / n for o, n in zip(old_s, new_s[b], strict=True))
        print(
            f"new {b} tokens/pass: median {med:.2f} s, {tokens} tokens in {passes} passes; "
            f"old/new {old_med / med:.2f}x (median of the rounds' own ratios {paired:.2f}x)"
        )


if __name__ == "__main__":
    main()
