"""Log-likelihood of a reply given its prompt: accuracy over given choices, and validation loss.

A reply is scored exactly as it would be trained: the conversation (prompt + reply) is rendered
through the chat template and the reply's tokens are the ones the training mask marks, so a
choice is judged in the same form the model is tuned to produce. The log-probabilities are the
training loss itself (train/loss.py's SupervisedLM, per row), so only reply positions go through
the output projection and an evaluation's loss is the training loop's validation loss.

Choices (`choose`) are scored without computing any prefix twice: the options of one question
share its rendered prompt, and every question shares the template's opening (the system turn).

    rows (ids, mask) of every option, grouped by question
      -> the start all rows share: one forward pass, its keys and values kept (a KV cache)
      -> per pass, whole questions up to TOKENS_PER_PASS tokens: the rest of their rows as one
         prefix tree (each distinct prefix once: a question's prompt, then each option's
         tokens), packed into one sequence; a token attends to the shared start and to its own
         ancestors in the tree (a 4D mask), at its position in its row (position ids)
      -> the output projection on the positions that predict a scored token only

A row's scored tokens, and the tokens before them, are exactly the ones `masked_logprobs` sees
(the same rendering and mask), so the scores are the row-by-row ones up to float rounding
(tests/test_likelihood_shared.py checks 1e-4). Attention kernels other than sdpa and eager
(flash attention takes no 4D mask) score row by row.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from instill.data.render import end_of_turn_ids, render_batch
from instill.train.loss import (
    ReplyScore,
    Rows,
    _parts,
    masked_logprobs,
    shares_prefixes,
    token_cross_entropy,
)

# Tokens packed into one forward pass of `shared_prefix_logprobs`: attention runs over the whole
# pack (the mask discards other branches' columns), so a bigger pack wastes more attention work
# against fewer passes. bench/likelihood_speed.py on the general suite, one thread, load average
# 8-10 (2026-12-02): 64 -> 47.6 s, 128 -> 34.0, 30.6, 17.5 s, 256 -> 37.4, 27.1, 18.5 s,
# 512 -> 57.8 s: 128 and 256 within the noise, fewer passes are better where matrix products
# are cheap (a GPU).
TOKENS_PER_PASS = 256


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
    rows = reply_rows(tokenizer, conversations, include_end=include_end)
    return masked_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size)


def reply_rows(
    tokenizer, conversations: Sequence[Sequence[dict]], *, include_end: bool = True
) -> list[tuple[list[int], list[int]]]:
    """(token ids, mask) of each conversation, the mask on its last assistant reply."""
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
    return rows


def choose(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    tokens_per_pass: int = TOKENS_PER_PASS,
) -> list[tuple[int, list[float]]]:
    """For each prompt, the index of the most likely choice and every choice's score.

    The score is the choice's log-probability divided by its length in UTF-8 bytes (what
    lm-evaluation-harness calls acc_norm): a longer choice is not penalised for its length, and
    unlike a per-token mean the score does not depend on how the tokenizer splits the words
    (a per-token mean favours words split into many easy pieces, which on the general suite put
    the default model at chance). batch_size: rows per pass where prefixes cannot be shared."""
    rows = choice_rows(tokenizer, prompts, choices)
    if shares_prefixes(model):
        groups, k = [], 0
        for options in choices:
            groups.append(rows[k : k + len(options)])
            k += len(options)
        per_group = shared_prefix_logprobs(model, groups, tokens_per_pass=tokens_per_pass)
        scores = [s for group in per_group for s in group]
    else:
        scores = masked_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
    return per_byte_choice(scores, choices)


def choice_rows(
    tokenizer, prompts: Sequence[Sequence[dict]], choices: Sequence[Sequence[str]]
) -> list[tuple[list[int], list[int]]]:
    """(token ids, mask) of every option of every prompt, in order: the option as the
    assistant's reply, its closing end-of-turn not scored."""
    flat = [
        [*prompt, {"role": "assistant", "content": choice}]
        for prompt, options in zip(prompts, choices, strict=True)
        for choice in options
    ]
    return reply_rows(tokenizer, flat, include_end=False)


def per_byte_choice(
    scores: Sequence[ReplyScore], choices: Sequence[Sequence[str]]
) -> list[tuple[int, list[float]]]:
    """The options' scores (in choice_rows' order) regrouped by prompt, each divided by the
    option's length in UTF-8 bytes, and each prompt's best option."""
    result, k = [], 0
    for options in choices:
        mine = [
            s.logprob / max(1, len(o.encode()))
            for s, o in zip(scores[k : k + len(options)], options, strict=True)
        ]
        k += len(options)
        result.append((max(range(len(mine)), key=mine.__getitem__), mine))
    return result


@dataclass
class _Tree:
    """Token sequences as a prefix tree, one node per distinct prefix, in insertion order (a
    parent before its children): the order the nodes are packed in."""

    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # -1: the first token of a sequence
    depth: list[int] = field(default_factory=list)
    _node: dict[tuple[int, int], int] = field(default_factory=dict)

    def add(self, seq: Sequence[int]) -> list[int]:
        """Insert a sequence; returns the node of each of its tokens."""
        nodes, at = [], -1
        for token in seq:
            node = self._node.get((at, token))
            if node is None:
                node = self._node[(at, token)] = len(self.tokens)
                self.tokens.append(token)
                self.parent.append(at)
                self.depth.append(len(nodes))
            nodes.append(node)
            at = node
        return nodes

    def mask(self, start: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive [1, 1, nodes, start + nodes] attention mask: every node sees the shared
        start and its own ancestors and itself, nothing else."""
        n = len(self.tokens)
        seen = torch.zeros((n, start + n), dtype=torch.bool)
        seen[:, :start] = True
        for i, up in enumerate(self.parent):
            if up >= 0:
                seen[i, start:] = seen[up, start:]
            seen[i, start + i] = True
        return torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, torch.finfo(dtype).min)[
            None, None
        ]


def _scored(rows: Rows) -> list[list[int]]:
    """Each row's scored positions: mask 1, after the first token (nothing predicts that one)."""
    return [[j for j in range(1, len(ids)) if mask[j]] for ids, mask in rows]


def _shared_start(rows: Rows, scored: list[list[int]]) -> int:
    """How many leading tokens every scored row shares, stopping before the first position that
    predicts a scored token (those run in the packed passes, where the head reads them)."""
    live = [list(ids) for (ids, _), s in zip(rows, scored, strict=True) if s]
    if not live:
        return 0
    n = min(s[0] for s in scored if s) - 1
    for ids in live[1:]:
        n = next((i for i in range(n) if ids[i] != live[0][i]), n)
    return n


def _passes(groups: Sequence[Rows], scored: list[list[int]], start: int, budget: int):
    """Consecutive whole groups, as lists of row indices, up to `budget` tree nodes each (a group
    larger than that runs alone), sized by each group's own tree."""
    passes, current, size, k = [], [], 0, 0
    for group in groups:
        tree = _Tree()
        for (ids, _), s in zip(group, scored[k : k + len(group)], strict=True):
            if s:
                tree.add(ids[start : s[-1]])
        if current and size + len(tree.tokens) > budget:
            passes.append(current)
            current, size = [], 0
        current.extend(range(k, k + len(group)))
        size += len(tree.tokens)
        k += len(group)
    if current:
        passes.append(current)
    return passes


@torch.inference_mode()
def shared_prefix_logprobs(
    model, groups: Sequence[Rows], *, tokens_per_pass: int = TOKENS_PER_PASS
) -> list[list[ReplyScore]]:
    """`masked_logprobs` of every row of every group, each distinct prefix computed once (the
    module docstring has the plan). Rows of a group should share their beginning (one
    question's options); groups are never split across passes."""
    rows = [row for group in groups for row in group]
    scored = _scored(rows)
    start = _shared_start(rows, scored)
    body, head, config = _parts(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    dtype = body.get_input_embeddings().weight.dtype
    cache = None
    if start:  # the tokens of a scored row: an unscored one may begin otherwise
        first = next(ids for (ids, _), s in zip(rows, scored, strict=True) if s)
        head_ids = torch.tensor([list(first[:start])], device=device)
        cache = body(input_ids=head_ids, use_cache=True).past_key_values
    sums = torch.zeros(len(rows), dtype=torch.float64)
    for members in _passes(groups, scored, start, tokens_per_pass):
        tree, nodes, targets, owner = _Tree(), [], [], []
        for r in members:
            if not scored[r]:
                continue
            ids = rows[r][0]
            path = tree.add(ids[start : scored[r][-1]])
            nodes += [path[j - 1 - start] for j in scored[r]]  # the node that predicts token j
            targets += [ids[j] for j in scored[r]]
            owner += [r] * len(scored[r])
        if not tree.tokens:
            continue
        hidden = body(
            input_ids=torch.tensor([tree.tokens], device=device),
            attention_mask=tree.mask(start, dtype).to(device),
            position_ids=torch.tensor([[start + d for d in tree.depth]], device=device),
            past_key_values=copy.deepcopy(cache),  # each pass appends to its own copy
            use_cache=cache is not None,
        ).last_hidden_state[0]
        ce = token_cross_entropy(
            head,
            hidden[torch.tensor(nodes, device=device)],
            torch.tensor(targets, device=device),
            softcap=softcap,
        )
        sums.index_add_(0, torch.tensor(owner), ce.double().cpu())
    out, k = [], 0
    for group in groups:
        out.append(
            [
                ReplyScore(-float(sums[r]) if scored[r] else 0.0, len(scored[r]))
                for r in range(k, k + len(group))
            ]
        )
        k += len(group)
    return out


def perplexity(scores: Sequence[ReplyScore]) -> tuple[float, float]:
    """(mean loss per token, perplexity) over all scored tokens."""
    tokens = sum(s.tokens for s in scores)
    if not tokens:
        return float("nan"), float("nan")
    loss = -sum(s.logprob for s in scores) / tokens
    return loss, math.exp(loss)
