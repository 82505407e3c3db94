"""Reload an export with an independent loader and compare it with the tuned model in memory.

The loader is llama.cpp itself (in-process, the optional extra `llama-cpp-python`) for GGUF files
when it is installed, transformers' GGUF reader otherwise; plain transformers for HF directories.
Which one ran is printed and recorded in instill.json.

Tolerances (max |logit diff| over every prompt and generated position; greedy agreement is the
share of positions where both models pick the same next token, teacher-forced on the tuned
model's own greedy reply of up to 16 tokens, end-of-turn included):

    fp32 / f32   1e-4   agreement 1.00   (llama.cpp: 1e-3; its kernels sum in another order)
    fp16 / f16   0.25   agreement 0.95
    bf16         1.0    agreement 0.90
    q8_0         1.0    agreement 0.90   (llama.cpp: 3.0; it rounds activations to 8 bits too)
    auto         report only   agreement 0.90  (mixed types, chosen by measurement)
    q4_0 / q4_1  report only   agreement 0.80  (4-bit rounding moves logits by whole units)
    llama.cpp's quantizer (--quant q6_k ... q2_k): report only, agreement by bits a weight:
    q6_k 0.90; q5_k_m, q5_k_s, q5_0, q5_1 0.85; q4_k_m, q4_k_s, iq4_xs, iq4_nl 0.80;
    q3_k_l, q3_k_m, q3_k_s 0.70; q2_k 0.60 (floors set by analogy with q8_0 and q4_x, not yet
    measured on tuned models)

An adapter GGUF is checked by the type of its own tensors, applied by llama.cpp on the base GGUF
as it is (a 4-bit base's own rounding is the base's, and part of what both models run).
`--min-agreement` replaces the agreement floor, for a user who accepts more drift knowingly.
The 4-bit floor is there because rounding a tuned model to 4 bits can undo the tuning while
the file still loads and talks: a merged q4_1 export of the quickstart's tuned model keeps few of
its answers and scores near the untuned base (the README's Verification section has the
measurements, from bench/gguf_deploy.py), where q8_0 keeps nearly all. (The base alone
re-exported to q4_1 reloads with identical logits: its weights are already on the 4-bit grid, so
the writer is exact and the drift is the rounding of the tuned weights.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from instill.data.render import end_of_turn_ids, render_prompt
from instill.errors import InstillError

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name three primary colours."},
    ],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "How many legs does a spider have? Reply with a number."}],
    [{"role": "user", "content": "Give a synonym for happy."}],
    [{"role": "user", "content": "Sort these words alphabetically: pear, apple, fig."}],
]

TOLERANCE = {  # format -> (max |logit diff| or None, minimum greedy agreement)
    "fp32": (1e-4, 1.0),
    "f32": (1e-4, 1.0),
    "fp16": (0.25, 0.95),
    "f16": (0.25, 0.95),
    "bf16": (1.0, 0.90),
    "q8_0": (1.0, 0.90),
    "auto": (None, 0.90),
    "q4_0": (None, 0.80),
    "q4_1": (None, 0.80),
    **dict.fromkeys(["q6_k"], (None, 0.90)),
    **dict.fromkeys(["q5_k_m", "q5_k_s", "q5_0", "q5_1"], (None, 0.85)),
    **dict.fromkeys(["q4_k_m", "q4_k_s", "iq4_xs", "iq4_nl"], (None, 0.80)),
    **dict.fromkeys(["q3_k_l", "q3_k_m", "q3_k_s"], (None, 0.70)),
    "q2_k": (None, 0.60),
}
FOUR_BITS_OR_FEWER = {k for k, (_, agree) in TOLERANCE.items() if agree <= 0.80} - {"auto"}


def looseness(kind: str) -> tuple[float, float]:
    """Orders types from strictest to loosest tolerance (a looser one is larger)."""
    logit, agree = TOLERANCE[kind]
    return (-agree, float("inf") if logit is None else logit)


# llama.cpp's own arithmetic: f32 kernels sum in another order than torch's, and its q8_0 (and
# 4-bit) matrix products round the activations to 8 bits as well as the weights
LLAMACPP_LOGITS = {"fp32": 1e-3, "f32": 1e-3, "q8_0": 3.0}


@dataclass
class Figures:
    max_logit_diff: float
    greedy_agreement: float
    positions: int
    prompt_tokens_identical: bool
    end_of_turn_survived: bool
    logit_tolerance: float | None
    agreement_tolerance: float
    verifier: str = "transformers"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reloaded:
    """An export as an independent loader sees it."""

    verifier: str  # what loaded it, printed and recorded
    prompt_ids: Callable[[list[dict]], list[int]]  # the loader's rendering and tokenisation
    logits: Callable[[list[int]], torch.Tensor]  # teacher-forced, one row per position
    end_of_turn_ok: bool  # the tuned model's end-of-turn tokens still end generation


def from_transformers(model, tokenizer, ref_tok, verifier: str = "transformers") -> Reloaded:
    eot_ok = (
        set(end_of_turn_ids(ref_tok)) <= set(end_of_turn_ids(tokenizer))
        and tokenizer.eos_token == ref_tok.eos_token
    )

    @torch.no_grad()
    def logits(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids])).logits[0].float()

    return Reloaded(verifier, lambda m: render_prompt(tokenizer, m), logits, eot_ok)


def from_llamacpp(engine, ref_tok, template: str) -> Reloaded:
    """llama.cpp as llama-server runs it: `template` (the one llama-server is given) rendered,
    then llama.cpp's own tokenizer; end-of-turn tokens must be end-of-generation to llama.cpp."""
    eot = end_of_turn_ids(ref_tok)
    eot_ok = all(
        engine.is_end_of_generation(t)
        and engine.detokenize([t]) == ref_tok.convert_ids_to_tokens(t)
        for t in eot
    )

    def prompt_ids(messages: list[dict]) -> list[int]:
        text = ref_tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return engine.tokenize(text)

    def logits(ids: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(engine.logits(ids)))

    return Reloaded(engine.name, prompt_ids, logits, eot_ok)


@torch.no_grad()
def greedy_reply(model, ids: list[int], new_tokens: int, eot: list[int]) -> list[int]:
    """The model's greedy reply to one rendered prompt, up to and with its end-of-turn token
    (what verification teacher-forces and --quant auto calibrates on).

    transformers' `generate`, not instill's engine (infer/engine.py), on purpose: the verifier is
    independent of instill's own inference code on both sides, the tuned model run by
    transformers (forward and decode) and the export read back by llama.cpp or transformers'
    GGUF reader, so a fault in the engine's cache or batching can neither pass nor fail an
    export. --quant auto (export/mixed.py) calls it too, so that it costs each tensor on the
    replies the verification then looks at."""
    # stop at end-of-turn: logits past it score text no one serves, and drift most
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eot,
        pad_token_id=eot[0],
    )
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def compare(reference, ref_tok, reloaded: Reloaded, kind: str, new_tokens: int = 16) -> Figures:
    diff, agree, total, same_prompt = 0.0, 0, 0, True
    for messages in PROMPTS:
        ids = render_prompt(ref_tok, messages)
        same_prompt &= reloaded.prompt_ids(messages) == ids
        seq = ids + greedy_reply(reference, ids, new_tokens, end_of_turn_ids(ref_tok))
        a = reference(input_ids=torch.tensor([seq])).logits[0, len(ids) - 1 :].float()
        b = reloaded.logits(seq)[len(ids) - 1 :]
        diff = max(diff, (a - b).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[0]
    logit_tol, agree_tol = TOLERANCE[kind]
    if reloaded.verifier.startswith("llama.cpp"):
        logit_tol = LLAMACPP_LOGITS.get(kind, logit_tol)
    return Figures(
        diff,
        agree / total,
        total,
        same_prompt,
        reloaded.end_of_turn_ok,
        logit_tol,
        agree_tol,
        reloaded.verifier,
    )


def check(figures: Figures, what: str) -> None:
    """Raise (so the atomic output directory is dropped) when the export is not faithful."""
    problems = []
    if not figures.prompt_tokens_identical:
        problems.append("the chat template renders different prompt tokens after reload")
    if not figures.end_of_turn_survived:
        problems.append("the end-of-turn / eos token did not survive")
    if figures.logit_tolerance is not None and figures.max_logit_diff > figures.logit_tolerance:
        problems.append(
            f"max |logit diff| {figures.max_logit_diff:.3g} > {figures.logit_tolerance:g}"
        )
    if figures.greedy_agreement < figures.agreement_tolerance:
        problems.append(
            f"greedy agreement {figures.greedy_agreement:.3f} < {figures.agreement_tolerance}"
        )
        if what.split()[-1] in FOUR_BITS_OR_FEWER:
            problems.append(
                "rounding the tuned weights to 4 bits or fewer changed the model's answers (the "
                "tuning may not survive it); export --quant q8_0 or q6_k instead, --quant auto "
                "(a smaller mixed file), or --format gguf-lora (the adapter for the 4-bit base as "
                "it is), or accept the drift knowingly with --min-agreement"
            )
    if problems:
        raise InstillError(f"export verification failed for {what}: " + "; ".join(problems))
