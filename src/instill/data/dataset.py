"""Build tokenised training rows from a recipe's data section, and batch them.

raw rows -> Conversation (formats.py) -> (input_ids, mask) (render.py) -> length policy -> batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from instill.config import DataConfig
from instill.data import builtin
from instill.data.formats import Conversation, detect_format, to_conversations
from instill.data.render import render_batch
from instill.data.sources import read_rows
from instill.errors import InstillError


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    mask: list[int]  # 1 where the token is trained on
    source: str

    @property
    def trained(self) -> int:
        return sum(self.mask)


@dataclass
class DataStats:
    rows_in: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def load_conversations(cfg: DataConfig) -> tuple[list[Conversation], dict[str, int]]:
    """Every training conversation the recipe names, mixed by weight (deterministic)."""
    convs: list[Conversation] = []
    formats: dict[str, int] = {}
    if cfg.builtin is not None and cfg.builtin.train_per_family > 0:
        b = cfg.builtin
        for ex in builtin.generate("train", b.train_per_family, b.seed, b.families):
            convs.append(
                Conversation(
                    ex.messages, f"builtin:{ex.family}", {"task": ex.family, "cluster": ex.cluster}
                )
            )
        formats["builtin"] = len(convs)
    for src in cfg.sources:
        these: list[Conversation] = []
        fmt = src.format
        for raw in read_rows(src.path):
            if fmt == "auto":
                try:
                    fmt = detect_format(raw.data)
                except InstillError as exc:
                    raise InstillError(f"{raw.where}: {exc}") from None
            these.extend(to_conversations(raw, fmt))
        formats[f"{src.path} ({fmt})"] = len(these)
        whole, part = divmod(src.weight, 1.0)
        mixed = these * int(whole)
        if part:
            rng = random.Random(f"{src.path}:{src.weight}")
            mixed += rng.sample(these, round(part * len(these)))
        convs.extend(mixed)
    return convs, formats


def tokenize(tokenizer, convs: list[Conversation], cfg: DataConfig) -> tuple[list[Row], DataStats]:
    """Render, then apply the length policy: truncate long rows, drop (and count) rows that would
    keep no trained token."""
    stats = DataStats(rows_in=len(convs))
    chats = [c for c in convs if c.messages[0]["role"] != "text"]
    texts = [c for c in convs if c.messages[0]["role"] == "text"]
    rendered = render_batch(tokenizer, [c.messages for c in chats], cfg.mask) if chats else []
    pairs = list(zip(chats, rendered, strict=True))
    if texts:
        enc = tokenizer([c.messages[0]["content"] for c in texts], add_special_tokens=True)[
            "input_ids"
        ]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        pairs += [
            (c, (ids + eos, [1] * (len(ids) + len(eos)))) for c, ids in zip(texts, enc, strict=True)
        ]
    rows: list[Row] = []
    for conv, (ids, mask) in pairs:
        if sum(mask) == 0:
            stats.dropped["no trained tokens"] = stats.dropped.get("no trained tokens", 0) + 1
            continue
        if len(ids) > cfg.max_length:
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            if sum(mask) == 0:
                key = f"no trained tokens within max_length={cfg.max_length}"
                stats.dropped[key] = stats.dropped.get(key, 0) + 1
                continue
            stats.truncated += 1
        rows.append(Row(ids, mask, conv.source))
    stats.rows = len(rows)
    stats.tokens = sum(len(r.input_ids) for r in rows)
    stats.trained_tokens = sum(r.trained for r in rows)
    if not rows:
        raise InstillError(
            f"no training rows left out of {stats.rows_in} after the length policy "
            f"({stats.dropped}); raise data.max_length"
        )
    return rows, stats


def build_training_rows(tokenizer, cfg: DataConfig) -> tuple[list[Row], DataStats]:
    convs, formats = load_conversations(cfg)
    rows, stats = tokenize(tokenizer, convs, cfg)
    stats.formats = formats
    return rows, stats


def length_grouped_batches(
    rows: list[Row], batch_size: int, seed: int, epoch: int = 0
) -> list[list[int]]:
    """Shuffle, then sort by length within windows of 32 batches so padding stays small,
    then shuffle the batch order. Deterministic in (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(rows[i].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. labels are -100 where the mask is 0 and on padding."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        attn[i, :n] = 1
        m = torch.tensor(r.mask, dtype=torch.bool)
        labels[i, :n] = torch.where(m, ids[i, :n], torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
