"""One generation function: batched, optionally streaming, greedy or sampling, stop strings and
the template's end-of-turn token. Prompts are rendered through the same chat template as training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from instill.data.render import end_of_turn_ids, render_prompt


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn or stop string) or "length"
    token_ids: tuple[int, ...] = ()  # the generated tokens, up to and with the end-of-turn one


class _Streamer:
    """Receives token ids from `model.generate` and calls `on_text` with each new piece of text."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], eot: set[int]):
        self.tokenizer, self.on_text, self.eot = tokenizer, on_text, eot
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for tid in value.reshape(-1).tolist():
            if self.done or tid in self.eot:
                self.done = True
                return
            self.ids.append(tid)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        pass


def _generation_config(model, tokenizer, params: GenParams, eot: list[int]):
    from transformers import GenerationConfig

    sample = params.temperature > 0
    kwargs = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=sample,
        eos_token_id=eot,
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=params.repetition_penalty,
    )
    if sample:
        kwargs.update(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None
        )
    return GenerationConfig(**kwargs)


class _StopStrings(StoppingCriteria):
    """Stops a row once its *generated* text contains a stop string. (transformers' own
    stop_strings also match across the prompt boundary, e.g. a prompt ending in a newline and a
    stop of two newlines, which ends replies early.)"""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, list(stops), prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stopping(tokenizer, params: GenParams, width: int):
    return StoppingCriteriaList(
        [_StopStrings(tokenizer, params.stop, width)] if params.stop else []
    )


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return text, False
    return text[: min(hits)], True


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    params: GenParams = GenParams(),
    *,
    batch_size: int = 16,
    on_text: Callable[[str], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Generate one reply per conversation, in input order.

    Conversations are grouped by prompt length into left-padded batches. `on_text` streams the
    reply of a single conversation as it is generated.
    """
    if on_text is not None and len(conversations) != 1:
        raise ValueError("streaming (on_text) takes exactly one conversation")
    device = next(model.parameters()).device
    eot = end_of_turn_ids(tokenizer)
    config = _generation_config(model, tokenizer, params, eot)
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id
    if params.seed is not None:
        torch.manual_seed(params.seed)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            attn[row, width - len(p) :] = 1
        streamer = _Streamer(tokenizer, on_text, set(eot)) if on_text else None
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            generation_config=config,
            streamer=streamer,
            stopping_criteria=_stopping(tokenizer, params, width),
        )
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            ended = False
            generated = new
            for j, tid in enumerate(new):
                if tid in eot:
                    new, ended, generated = new[:j], True, new[: j + 1]
                    break
            text = tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = _cut(text, params.stop)
            finish = "stop" if ended or stopped else "length"
            results[i] = Generation(text, len(prompts[i]), len(new), finish, tuple(generated))
        if on_batch is not None:
            on_batch(len(idx))
    return results  # type: ignore[return-value]
