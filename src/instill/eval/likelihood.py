"""Log-likelihood of a reply given its prompt: accuracy over given choices, and validation loss.

A reply is scored exactly as it would be trained: the conversation (prompt + reply) is rendered
through the chat template and the reply's tokens are the ones the training mask marks, so a
choice is judged in the same form the model is tuned to produce. The log-probabilities are the
training loss itself (train/loss.py's SupervisedLM, per row), so only reply positions go through
the output projection and an evaluation's loss is the training loop's validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from instill.data.dataset import labels_from, pad_right
from instill.data.render import end_of_turn_ids, render_batch
from instill.train.loss import SupervisedLM


@dataclass(frozen=True)
class ReplyScore:
    logprob: float  # sum of the reply tokens' log-probabilities
    tokens: int  # how many reply tokens were scored

    @property
    def mean(self) -> float:
        return self.logprob / self.tokens if self.tokens else float("-inf")


@torch.inference_mode()
def reply_logprobs(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    *,
    include_end: bool = True,
    batch_size: int = 8,
) -> list[ReplyScore]:
    """The log-probability of each conversation's last assistant reply given everything before it.

    include_end: count the end-of-turn token that closes the reply (right for a validation loss:
    it is trained; wrong for comparing choices, where it would reward the shorter one).
    """
    rendered = render_batch(tokenizer, [list(c) for c in conversations], "last_assistant")
    eot = set(end_of_turn_ids(tokenizer))
    rows = []
    for ids, mask in rendered:
        mask = list(mask)
        if not include_end:
            # drop the closing end-of-turn token(s) and whatever the template puts after them
            last = max(i for i, m in enumerate(mask) if m)
            while last >= 0 and mask[last] and ids[last] in eot:
                mask[last] = 0
                last -= 1
        rows.append((ids, mask))
    return masked_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size)


@torch.inference_mode()
def masked_logprobs(
    model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int, *, batch_size: int = 8
) -> list[ReplyScore]:
    """For each (token ids, mask) row, the summed log-probability of the tokens where the mask
    is 1, each given everything before it. Rows are length-sorted into padded batches."""
    lm, device = SupervisedLM(model), next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[ReplyScore | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, attn, target_mask = pad_right([rows[i] for i in idx], pad)
        losses, counts = lm(
            input_ids=ids.to(device),
            labels=labels_from(ids, target_mask).to(device),
            attention_mask=attn.to(device),
            per_row=True,
        )
        for r, i in enumerate(idx):
            out[i] = ReplyScore(-float(losses[r]) if counts[r] else 0.0, int(counts[r]))
    return out  # type: ignore[return-value]


def choose(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
) -> list[tuple[int, list[float]]]:
    """For each prompt, the index of the most likely choice and every choice's score.

    The score is the choice's log-probability divided by its length in UTF-8 bytes (what
    lm-evaluation-harness calls acc_norm): a longer choice is not penalised for its length, and
    unlike a per-token mean the score does not depend on how the tokenizer splits the words
    (a per-token mean favours words split into many easy pieces, which on the general suite put
    the default model at chance)."""
    flat = [
        [*prompt, {"role": "assistant", "content": choice}]
        for prompt, options in zip(prompts, choices, strict=True)
        for choice in options
    ]
    scores = reply_logprobs(model, tokenizer, flat, include_end=False, batch_size=batch_size)
    result, k = [], 0
    for options in choices:
        mine = [
            s.logprob / max(1, len(o.encode()))
            for s, o in zip(scores[k : k + len(options)], options, strict=True)
        ]
        k += len(options)
        result.append((max(range(len(mine)), key=mine.__getitem__), mine))
    return result


def perplexity(scores: Sequence[ReplyScore]) -> tuple[float, float]:
    """(mean loss per token, perplexity) over all scored tokens."""
    tokens = sum(s.tokens for s in scores)
    if not tokens:
        return float("nan"), float("nan")
    loss = -sum(s.logprob for s in scores) / tokens
    return loss, math.exp(loss)
