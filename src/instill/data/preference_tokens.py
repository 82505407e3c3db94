"""Preference rows -> tokens: a pair renders to its prompt's ids once plus each reply's ids and
loss mask, through the same chat template and masked rendering as supervised rows.

    tokenize_preferences(tokenizer, [Pair | Labelled], max_length)
        -> ([PairRow | LabelledRow], DataStats)

Each reply is rendered as the whole conversation (prompt + reply) by render.render_batch, with
every assistant turn masked; the prompt alone is rendered with the generation prompt, and its
tokens must be a prefix of both full renderings (else the template rewrites the prompt when a
reply follows, and the two replies would not be scored after the same context). The mask is then
cleared over the prompt, so a multi-turn prompt's earlier assistant turns carry no loss, and the
tokens the template writes after the reply's end-of-turn token (a newline) are dropped: they
carry no loss and only cost compute.

Length policy: a reply is cut so that prompt + reply fits max_length (the row is counted as
truncated); a prompt that leaves no room for a reply is an error counting such rows and naming
the setting, never a silent drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from instill.data.dataset import DataStats
from instill.data.preference import Labelled, Pair
from instill.data.render import MaskPolicy, render_batch, render_prompts
from instill.errors import InstillError


@dataclass(frozen=True)
class PairRow:
    """A tokenised pair: the prompt's ids once, each reply's ids continuing them, and each
    reply's loss mask (1 on the reply's tokens through its end-of-turn token)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    source: str
    # the reference model's summed log-probs of (chosen, rejected), when precomputed
    reference: tuple[float, float] | None = None

    def chosen(self) -> tuple[list[int], list[int]]:
        """(ids, mask) of prompt + chosen reply, mask 0 over the prompt."""
        return _whole(self.prompt_ids, self.chosen_ids, self.chosen_mask)

    def rejected(self) -> tuple[list[int], list[int]]:
        """(ids, mask) of prompt + rejected reply, mask 0 over the prompt."""
        return _whole(self.prompt_ids, self.rejected_ids, self.rejected_mask)

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def width(self) -> int:
        """The padded width its two sequences take in a batch (prompt + the longer reply): what
        length grouping sorts pairs by."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def trained(self) -> int:
        return sum(self.chosen_mask) + sum(self.rejected_mask)


@dataclass(frozen=True)
class LabelledRow:
    """A tokenised labelled completion (KTO): prompt ids, the reply's ids and mask, its label."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    desirable: bool
    source: str
    reference: tuple[float, float] | None = None  # (completion, KL partner), when precomputed

    def sequence(self) -> tuple[list[int], list[int]]:
        """(ids, mask) of prompt + completion, mask 0 over the prompt."""
        return _whole(self.prompt_ids, self.completion_ids, self.completion_mask)

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def trained(self) -> int:
        return sum(self.completion_mask)


def _whole(prompt: list[int], ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    return prompt + ids, [0] * len(prompt) + mask


def _replies(item: Pair | Labelled) -> list[tuple[dict, ...]]:
    return [item.chosen, item.rejected] if isinstance(item, Pair) else [item.completion]


_UNSTABLE = (
    "chat template is not prefix-stable at the reply: the prompt rendered alone gives "
    "different tokens than the same part of the prompt followed by a reply (or the reply "
    "renders to no trained token), so the replies cannot be scored after one prompt; supply a "
    "template that renders earlier turns unchanged (model.chat_template)"
)


def _reply_part(
    prompt: list[int], ids: list[int], mask: list[int]
) -> tuple[list[int], list[int]] | None:
    """The reply's (ids, mask) after `prompt`, through its last trained token; None when the
    prompt's tokens are not a prefix of the whole rendering or no reply token is trained."""
    if ids[: len(prompt)] != prompt:
        return None
    ids, mask = ids[len(prompt) :], mask[len(prompt) :]
    end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    return (ids[:end], mask[:end]) if end else None


def tokenize_preferences(
    tokenizer,
    items: Sequence[Pair | Labelled],
    max_length: int,
    skipped: list[dict] | None = None,
    setting: str = "data.max_length",
) -> tuple[list[PairRow | LabelledRow], DataStats]:
    """Render pairs and labelled completions (see the module docstring). With `skipped`, a row
    the chat template refuses or cannot render prefix-stably, or whose prompt leaves no room
    for a reply within `max_length`, is recorded there; without it, it raises (the latter
    counting every such row and naming the setting)."""
    stats = DataStats(rows_in=len(items))
    convs, where = [], []
    for item in items:
        for reply in _replies(item):
            convs.append((*item.prompt, *reply))
            where.append(item.source)
    errors: list[tuple[int, str]] | None = [] if skipped is not None else None
    rendered = render_batch(tokenizer, convs, MaskPolicy.ASSISTANT, where=where, errors=errors)
    refused = {i: reason for i, reason in errors or []}
    prompt_errors: list[tuple[int, str]] = []
    prompts = render_prompts(tokenizer, [item.prompt for item in items], prompt_errors)
    refused_prompt = {
        i: f"{items[i].source}: {reason}; fix the row or supply a template that accepts it "
        "(model.chat_template)"
        for i, reason in prompt_errors
    }
    rows: list[PairRow | LabelledRow] = []
    no_room: list[str] = []
    k = 0
    for i, (item, prompt) in enumerate(zip(items, prompts, strict=True)):
        n = len(_replies(item))
        reason = refused_prompt.get(i) or next(
            (refused[j] for j in range(k, k + n) if j in refused), None
        )
        parts = [] if reason else [_reply_part(prompt, *rendered[j]) for j in range(k, k + n)]
        k += n
        if reason is None and not all(parts):
            reason = f"{item.source}: {_UNSTABLE}"
        if reason is not None:
            if skipped is None:
                raise InstillError(reason)
            skipped.append({"where": item.source, "reason": reason})
            continue
        room = max_length - len(prompt)
        if room <= 0:
            no_room.append(item.source)
            continue
        if any(len(ids) > room for ids, _ in parts):
            stats.truncated += 1
            parts = [(ids[:room], mask[:room]) for ids, mask in parts]
        if isinstance(item, Pair):
            (c, cm), (r, rm) = parts
            rows.append(PairRow(prompt, c, cm, r, rm, item.source))
        else:
            ((c, cm),) = parts
            rows.append(LabelledRow(prompt, c, cm, item.desirable, item.source))
    if no_room and skipped is not None:  # data.on_error: skip: listed in skipped_rows.jsonl
        reason = f"the prompt leaves no room for a reply within {setting}={max_length}"
        skipped += [{"where": where, "reason": reason} for where in no_room]
    elif no_room:
        raise InstillError(
            f"{len(no_room)} of {len(items)} preference rows have a prompt of {max_length} "
            f"tokens or more, which leaves no room for a reply within {setting}={max_length} "
            f"(first: {no_room[0]}); raise {setting}, shorten those prompts, or skip them "
            "(data.on_error: skip lists them in the run's skipped_rows.jsonl)"
        )
    if len(items) > len(rows):  # skipped rows, counted so that rows in = rows out + dropped
        stats.dropped["skipped (skipped_rows.jsonl)"] = len(items) - len(rows)
    stats.rows = len(rows)
    stats.tokens = sum(r.tokens for r in rows)
    stats.trained_tokens = sum(r.trained for r in rows)
    return rows, stats


def hash_row(h, row: PairRow | LabelledRow) -> None:
    """Feed one tokenised preference row into the hash `h`: each sequence's length, ids and
    mask, then what kind of row it is (a pair, or a desirable / undesirable reply)."""
    import numpy as np

    pair = isinstance(row, PairRow)
    for ids, mask in [row.chosen(), row.rejected()] if pair else [row.sequence()]:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.asarray(mask, dtype=np.int8).tobytes())
    h.update(b"p" if pair else (b"+" if row.desirable else b"x"))


def rows_sha256(rows: Sequence[PairRow | LabelledRow]) -> str:
    """The tokenised rows' digest: the same digest means the same rows, in the same order."""
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        hash_row(h, row)
    return h.hexdigest()
