"""Int8 weight-only decoding (infer/int8.py) against float32 on the default model: greedy
agreement, single-stream decode speed, and where a decode step's time goes.

    python bench/int8_decode.py                      # 64 general_gen prompts, 32 new tokens
    python bench/int8_decode.py --prompts 16 --rounds 2 --tokens 16     # quick

1. Greedy agreement with float32 over the general_gen prompts (first `--new` tokens, the
   engine at batch 16): replies identical, tokens equal position by position, tokens before the
   first difference; with the output projection quantised and without, and a control: float32
   with rows unpadded, whose products round differently (the near-ties). The int8 model here
   multiplies by its dequantised weights (int8 x scale as float32 Linear layers): the same
   numbers as the kernel up to rounding order (tests/test_int8.py), at float32's speed, since
   the kernel is slow where this was measured (AVX2, AVX-512). `--kernel-prompts N` also runs
   the first N prompts through the kernel itself.
2. Single-stream decode tokens/s, float32 and int8 (the kernel), interleaved A B A B so both
   see the same load: decode steps only (timed from the first step's end to the last's),
   replies forced to full length, the engine one row unpadded as chat and the server run it.
3. The time split of a decode step: the Linear layers (forward hooks) against everything
   else, for both.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from instill.data.render import render_prompt
from instill.infer.engine import Engine, GenParams, Job
from instill.infer.int8 import Int8Linear, int8_unavailable, quantize_int8


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def dequantized_copy(model, lm_head: bool):
    """The model as int8 weights compute it, in float32 Linear layers (fast everywhere)."""
    m = copy.deepcopy(model)
    quantize_int8(m, lm_head=lm_head)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight = nn.Parameter(child.dequantized(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias, requires_grad=False)
                setattr(parent, name, lin)
    return m


def replies(model, tokenizer, prompts, new: int, row_block: int = 4) -> list[list[int]]:
    jobs = [Job(p, GenParams(max_new_tokens=new), live=False) for p in prompts]
    Engine(model, tokenizer, 16, row_block=row_block).run(jobs)
    return [j.ids + ([j.end_of_turn] if j.end_of_turn is not None else []) for j in jobs]


def agreement(ref: list[list[int]], got: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    total = sum(max(len(a), len(b)) for a, b in zip(ref, got, strict=True))
    pairs = list(zip(ref, got, strict=True))
    equal = sum(sum(x == y for x, y in zip(a, b, strict=False)) for a, b in pairs)
    prefix = sum(
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(ref, got, strict=True)
    )
    return (
        f"identical replies {same}/{len(ref)} ({same / len(ref):.0%}), tokens equal by position "
        f"{equal}/{total} ({equal / total:.1%}), before the first difference "
        f"{prefix}/{sum(map(len, ref))}"
    )


class _TimedEngine(Engine):
    """The engine, noting when each decode step ends and the time spent in Linear layers so far
    (grown by step_split's hooks)."""

    linear_seconds = 0.0

    def _step(self) -> None:
        super()._step()
        self.stamps.append((time.perf_counter(), self.linear_seconds))


def _timed_run(model, tokenizer, prompt, tokens: int, hooked: bool = False):
    """Seconds a decode step, and of it in the Linear layers (with `hooked`), over one run: from
    the first step's end to the last's, so the prefill is left out without subtracting another
    run (which, on a loaded machine, can be the slower one)."""
    engine = _TimedEngine(model, tokenizer, 1, eot=[], row_block=1)
    engine.stamps, handles, started = [], [], {}
    if hooked:

        def before(module, args):
            started[module] = time.perf_counter()

        def after(module, args, out):
            engine.linear_seconds += time.perf_counter() - started[module]

        for m in model.modules():
            if isinstance(m, nn.Linear | Int8Linear):
                handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        engine.run([Job(prompt, GenParams(max_new_tokens=tokens), live=False)])
    finally:
        for h in handles:
            h.remove()
    (t0, l0), (t1, l1) = engine.stamps[0], engine.stamps[-1]
    steps = len(engine.stamps) - 1
    return (t1 - t0) / steps, (l1 - l0) / steps


def decode_rate(model, tokenizer, prompt, tokens: int) -> float:
    return 1 / _timed_run(model, tokenizer, prompt, tokens)[0]


def step_split(model, tokenizer, prompt, tokens: int = 12) -> str:
    """A decode step's time: in the Linear layers (timed by forward hooks) against the rest
    (attention, norms, rotary embedding, sampling, Python)."""
    step, linear = _timed_run(model, tokenizer, prompt, tokens, hooked=True)
    return (
        f"{step * 1e3:.1f} ms a step: Linear layers {linear * 1e3:.1f} ms "
        f"({linear / step:.0%}), the rest {(step - linear) * 1e3:.1f} ms"
    )


def agreement_section(model, tok, prompts, new: int, kernel_prompts: int) -> None:
    print(
        f"\n1. greedy agreement with float32, {len(prompts)} general_gen prompts, "
        f"first {new} new tokens ({_load()})"
    )
    ref = replies(model, tok, prompts, new)
    # the control: float32 itself, rows unpadded (as chat and the server run them), which
    # changes only the rounding of the products: the near-ties a rounding flips
    got = replies(model, tok, prompts, new, row_block=1)
    print(f"  float32, rows unpadded (control): {agreement(ref, got)}", flush=True)
    for head in (True, False):
        got = replies(dequantized_copy(model, head), tok, prompts, new)
        label = "int8, output projection int8 " if head else "int8, output projection fp32"
        print(f"  {label}: {agreement(ref, got)}", flush=True)
    if kernel_prompts:
        n = kernel_prompts
        int8 = copy.deepcopy(model)
        quantize_int8(int8)
        got = replies(int8, tok, prompts[:n], new)
        print(f"  int8 kernel itself, first {n} prompts: {agreement(ref[:n], got)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=64, help="general_gen prompts (0: skip)")
    ap.add_argument("--new", type=int, default=32, help="new tokens compared per reply")
    ap.add_argument("--kernel-prompts", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=32, help="single-stream decode length")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--head", choices=("int8", "fp32"), default="int8", help="the speed runs' output layer"
    )
    args = ap.parse_args()
    import transformers

    from instill.eval.tasks import general_gen_task
    from instill.models import load_for_inference

    transformers.logging.set_verbosity_error()
    loaded = load_for_inference(args.model)
    model, tok = loaded.model, loaded.tokenizer
    print(
        f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, threads "
        f"{torch.get_num_threads()}; kernel check: {int8_unavailable() or 'int8 faster'}"
    )
    examples = general_gen_task(8).examples[: args.prompts]
    prompts = [render_prompt(tok, list(e.prompt)) for e in examples]

    if prompts:
        agreement_section(model, tok, prompts, args.new, args.kernel_prompts)
    int8 = copy.deepcopy(model)
    quantize_int8(int8, lm_head=args.head == "int8")

    prompt = render_prompt(tok, [{"role": "user", "content": "Write about bread."}])
    print(
        f"\n2. single-stream decode, {args.tokens} tokens, 1 row, int8 output layer "
        f"{args.head} ({_load()})"
    )
    rates: dict[str, list[float]] = {"float32": [], "int8": []}
    models = {"float32": model, "int8": int8}
    with torch.inference_mode():
        for r in range(args.rounds):
            for name in list(models) if r % 2 == 0 else list(reversed(models)):
                rates[name].append(decode_rate(models[name], tok, prompt, args.tokens))
    base = statistics.median(rates["float32"])
    for name, rs in rates.items():
        med = statistics.median(rs)
        shown = ", ".join(f"{x:.1f}" for x in rs)
        print(f"  {name:<8} {med:6.2f} tok/s  {med / base:5.2f}x   rounds: {shown}")
    print(f"  ({_load()})")

    print(f"\n3. one decode step, split ({_load()})")
    with torch.inference_mode():
        for name, m in models.items():
            print(f"  {name:<8} {step_split(m, tok, prompt)}", flush=True)
    print(f"  ({_load()})")


if __name__ == "__main__":
    main()
