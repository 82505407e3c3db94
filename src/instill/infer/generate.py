"""One generation function, for evaluation, `instill generate` and chat: conversations in, one
reply each, in input order.

    conversations -> render_prompt (the chat template, as in training) -> one Job each
      -> engine.Engine.run: continuous batching, up to `batch_size` rows at a time
      -> Generation(text, prompt_tokens, completion_tokens, finish_reason, token_ids)

The server runs the same engine from its own thread (serve/scheduler.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from instill.data.render import render_prompt
from instill.infer.engine import ROW_BLOCK, Engine, GenParams, Job


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn or stop string) or "length"
    token_ids: tuple[int, ...] = ()  # the generated tokens, up to and with the end-of-turn one
    logprob: float | None = None  # with logprobs=True: token_ids' summed log-probability


def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    params: GenParams | Sequence[GenParams] = GenParams(),
    *,
    batch_size: int = 16,
    on_text: Callable[[str], None] | None = None,
    on_reply: Callable[[int, Generation], None] | None = None,
    batch_invariant: bool = True,
    logprobs: bool = False,
) -> list[Generation]:
    """Generate one reply per conversation, in input order; `on_text` streams the reply of a
    single conversation as it is generated; `on_reply(i, generation)` gets each reply as it
    ends (prompts are then taken in input order). A greedy reply is the same, bit for bit, whatever
    else is in the list and whatever `batch_size`; a seeded one too (each reply draws from its
    own generator seeded with `params.seed`). `batch_invariant=False` runs rows unpadded, which
    a single conversation (chat) decodes faster: its last bits are then a one-row product's
    (engine.py; the README's Generation section has the speeds). `params` may also be one
    GenParams per conversation (several seeded samples of one prompt, each with its own seed).
    `logprobs`: each Generation also carries its tokens' summed log-probability under the model
    (as scored while decoding: a drift anchor needs no second pass over the replies)."""
    if on_text is not None and len(conversations) != 1:
        raise ValueError("streaming (on_text) takes exactly one conversation")
    each = [params] * len(conversations) if isinstance(params, GenParams) else list(params)
    if len(each) != len(conversations):
        raise ValueError(f"{len(each)} GenParams for {len(conversations)} conversations")
    jobs = [
        Job(render_prompt(tokenizer, c), p, on_text=on_text, live=False)
        for c, p in zip(conversations, each, strict=True)
    ]
    if not jobs:
        return []
    row_block = ROW_BLOCK if batch_invariant else 1
    engine = Engine(
        model, tokenizer, min(batch_size, len(jobs)), row_block=row_block, logprobs=logprobs
    )
    if on_reply is None:
        engine.run(jobs)
    else:
        index = {id(job): i for i, job in enumerate(jobs)}
        engine.run(jobs, lambda job: on_reply(index[id(job)], generation_of(job)), in_order=True)
    return [generation_of(job) for job in jobs]


def generation_of(job: Job) -> Generation:
    """A finished job as its Generation (the torch engine's and llama.cpp's alike)."""
    eot = (job.end_of_turn,) if job.end_of_turn is not None else ()
    return Generation(
        job.text, len(job.prompt), len(job.ids), job.finish_reason, (*job.ids, *eot), job.logprob
    )
