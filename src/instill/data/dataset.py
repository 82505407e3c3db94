"""Build tokenised training rows from a recipe's data section, and batch them.

raw rows -> Conversation (formats.py) -> (input_ids, mask) (render.py) -> length policy -> batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from instill.config import DataConfig
from instill.data import builtin
from instill.data.formats import Conversation, detect_format, to_conversations
from instill.data.render import end_of_turn_ids, render_batch
from instill.data.sources import convert_source
from instill.errors import InstillError


@dataclass(frozen=True)
class Row:
    input_ids: list[int]
    mask: list[int]  # 1 where the token is trained on
    source: str
    replay: bool = False  # a replay row (data.replay): the base model's own reply

    @property
    def trained(self) -> int:
        return sum(self.mask)

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    rows_in: int = 0
    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    validation_rows: int = 0
    held_out: int = 0  # rows of eval.holdout_clusters, kept out of training and validation
    # Where the training sources' rows went, so that the report's data table adds up:
    # read - held_out_read - validation_split + weighted = rows_in (None: not recorded)
    read: int | None = None  # rows read from the training sources (built-in, data.sources)
    held_out_read: int = 0  # of those, rows of eval.holdout_clusters
    validation_split: int = 0  # of those, rows the validation split took (data.validation)
    weighted: int = 0  # rows that source weights repeated (+) or left out (-)
    replay_rows: int = 0  # rows of data.replay mixed in (counted in rows and tokens too)
    replay_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


UNRENDERABLE = "the chat template cannot render it"


@dataclass
class Data:
    train: list[Row]
    validation: list[Row]
    stats: DataStats
    skipped: list[dict]  # {"where": file:line, "reason": ...} for every row skipped on error
    from_cache: bool = False
    # A preference run's held-out pairs (PairRow), scored before and after training: a pair
    # method's validation rows themselves, or kto's validation prompts' pairs when it trains
    # from pairs ([] from labelled rows alone). None for supervised data. Not in the data's
    # digest: they are the validation rows' prompts and replies, paired.
    validation_pairs: list | None = None


def _split(convs: list[Conversation], fraction: float, seed: int, key: str):
    """Hold out `fraction` of a source's conversations, chosen by (seed, source)."""
    if fraction <= 0 or not convs:
        return convs, []
    order = list(range(len(convs)))
    random.Random(f"{seed}:{key}").shuffle(order)
    n_val = max(1, round(fraction * len(convs)))
    held = set(order[:n_val])
    return [c for i, c in enumerate(convs) if i not in held], [convs[i] for i in sorted(held)]


def _weighted(convs: list[Conversation], weight: float, seed: int, key: str):
    whole, part = divmod(weight, 1.0)
    mixed = convs * int(whole)
    if part:
        mixed += random.Random(f"{seed}:{key}:{weight}").sample(convs, round(part * len(convs)))
    return mixed


def read_conversations(
    path: str,
    fmt: str,
    split: str,
    skipped: list[dict] | None,
    columns: dict[str, str] | None = None,
):
    """Conversations of one source; with `skipped`, bad rows are recorded there, not raised.

    `columns` renames a row's keys (old -> new) before its format is detected."""
    return convert_source(path, fmt, split, skipped, columns, detect_format, to_conversations)


def held_out(conv: Conversation, holdout) -> bool:
    """Whether a conversation belongs to a held-out task cluster (its cluster or task field)."""
    return bool(holdout) and (
        conv.meta.get("cluster") in holdout or conv.meta.get("task") in holdout
    )


def _drop_heldout(convs, holdout, heldout: list | None, seen: set):
    for c in convs:
        seen.update(str(c.meta[k]) for k in ("cluster", "task") if c.meta.get(k))
    if not holdout:
        return convs
    if heldout is not None:
        heldout.extend(c for c in convs if held_out(c, holdout))
    return [c for c in convs if not held_out(c, holdout)]


def load_conversations(
    cfg: DataConfig,
    skipped: list[dict] | None = None,
    holdout: frozenset[str] = frozenset(),
    heldout: list[Conversation] | None = None,
    flow: dict | None = None,
):
    """Training and validation conversations the recipe names, mixed by weight (deterministic).

    Returns (train, validation, formats). The validation split is taken from each source before
    weighting, so a repeated row can never sit on both sides. Rows of `holdout` clusters are
    removed from both (after the split, so the split does not depend on the holdout) and, when
    `heldout` is a list, collected there. `flow`, when given, gets DataStats' read,
    held_out_read, validation_split and weighted.
    """
    clusters: set[str] = set()
    train: list[Conversation] = []
    val: list[Conversation] = []
    formats: dict[str, int] = {}
    counts = {"read": 0, "held_out_read": 0, "validation_split": 0, "weighted": 0}

    def count(convs, t, v, mixed) -> None:
        counts["read"] += len(convs)
        counts["validation_split"] += len(v)
        counts["held_out_read"] += len(convs) - len(t) - len(v)
        counts["weighted"] += len(mixed) - len(t)

    fraction = cfg.validation if isinstance(cfg.validation, float) else 0.0
    if cfg.builtin is not None and cfg.builtin.train_per_family > 0:
        b = cfg.builtin
        convs = [
            Conversation(
                ex.messages, f"builtin:{ex.family}", {"task": ex.family, "cluster": ex.cluster}
            )
            for ex in builtin.generate("train", b.train_per_family, b.seed, b.families)
        ]
        formats["builtin"] = len(convs)
        t, v = _split(convs, fraction, cfg.seed, "builtin")
        t, v = (_drop_heldout(x, holdout, heldout, clusters) for x in (t, v))
        count(convs, t, v, t)
        train, val = train + t, val + v
    for src in cfg.sources:
        convs, fmt = read_conversations(src.path, src.format, src.split, skipped, src.columns)
        formats[f"{src.path} ({fmt})"] = len(convs)
        t, v = _split(convs, fraction, cfg.seed, src.path)
        t, v = (_drop_heldout(x, holdout, heldout, clusters) for x in (t, v))
        mixed = _weighted(t, src.weight, cfg.seed, src.path)
        count(convs, t, v, mixed)
        train += mixed
        val += v
    if isinstance(cfg.validation, str) and cfg.validation:
        val, fmt = read_conversations(cfg.validation, "auto", "train", skipped)
        val = _drop_heldout(val, holdout, heldout, clusters)
        formats[f"{cfg.validation} ({fmt}, validation)"] = len(val)
    unknown = sorted(set(holdout) - clusters)
    if unknown:
        raise InstillError(
            f"eval.holdout_clusters: {', '.join(unknown)} match(es) no training row's cluster or "
            f"task; the data has: {', '.join(sorted(clusters)) or 'no cluster fields'}"
        )
    if flow is not None:
        flow.update(counts)
    return train, val, formats


def tokenize(
    tokenizer, convs: list[Conversation], cfg: DataConfig, skipped: list[dict] | None = None
) -> tuple[list[Row], DataStats]:
    """Render, then apply the length policy: truncate long rows, drop (and count) rows that would
    keep no trained token."""
    stats = DataStats(rows_in=len(convs))
    chats = [c for c in convs if c.messages[0]["role"] != "text"]
    texts = [c for c in convs if c.messages[0]["role"] == "text"]
    errors: list[tuple[int, str]] | None = [] if skipped is not None else None
    rendered = (
        render_batch(
            tokenizer,
            [c.messages for c in chats],
            cfg.mask,
            where=[c.source for c in chats],
            errors=errors,
        )
        if chats
        else []
    )
    for i, reason in errors or []:
        skipped.append({"where": chats[i].source, "reason": reason})
    if errors:  # counted here too, so rows in = rows out + dropped
        stats.dropped[UNRENDERABLE] = len(errors)
    pairs = [(c, r) for c, r in zip(chats, rendered, strict=True) if r is not None]
    if texts:
        enc = tokenizer([c.messages[0]["content"] for c in texts], add_special_tokens=True)[
            "input_ids"
        ]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        pairs += [
            (c, (ids + eos, [1] * (len(ids) + len(eos)))) for c, ids in zip(texts, enc, strict=True)
        ]
    rows: list[Row] = []
    eot = set(end_of_turn_ids(tokenizer))
    for conv, (ids, mask) in pairs:
        if conv.meta.get("cut"):  # the reply was cut off, not ended: do not teach ending it there
            mask = list(mask)
            last = max((i for i, m in enumerate(mask) if m), default=-1)
            while last >= 0 and mask[last] and ids[last] in eot:
                mask[last] = 0
                last -= 1
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
        rows.append(Row(ids, mask, conv.source, bool(conv.meta.get("replay"))))
    stats.rows = len(rows)
    stats.tokens = sum(len(r.input_ids) for r in rows)
    stats.trained_tokens = sum(r.trained for r in rows)
    return rows, stats


def build_data(
    tokenizer, cfg: DataConfig, *, cache: bool = True, holdout: frozenset[str] = frozenset()
) -> Data:
    """Everything the loop trains and validates on, with counts of what was dropped or skipped.

    The result is cached under $INSTILL_HOME/data-cache, keyed by the data, tokenizer and config.
    """
    from instill.data import cache as data_cache
    from instill.home import instill_home

    key = data_cache.cache_key(cfg, tokenizer, holdout) if cache else None
    folder = instill_home() / "data-cache"
    if key is not None:
        hit = data_cache.load(folder, key, Row, DataStats, Data)
        if hit is not None:
            return hit
    data = _build_data(tokenizer, cfg, holdout)
    if key is not None:
        data_cache.save(folder, key, data)
    return data


def _build_data(tokenizer, cfg: DataConfig, holdout: frozenset[str] = frozenset()) -> Data:
    skipped: list[dict] | None = [] if cfg.on_error == "skip" else None
    heldout: list[Conversation] = []
    flow: dict = {}
    train_convs, val_convs, formats = load_conversations(
        cfg, skipped, frozenset(holdout), heldout, flow
    )
    rows, stats = tokenize(tokenizer, train_convs, cfg, skipped)
    for key, n in flow.items():
        setattr(stats, key, n)
    val_rows, _ = tokenize(tokenizer, val_convs, cfg, skipped) if val_convs else ([], None)
    stats.formats = formats
    stats.validation_rows = len(val_rows)
    stats.held_out = len(heldout)
    stats.skipped = len(skipped or [])
    if not rows:
        raise InstillError(
            f"no training rows left out of {stats.rows_in} (dropped: {stats.dropped}, "
            f"skipped: {stats.skipped}); raise data.max_length or fix the data"
        )
    return Data(rows, val_rows, stats, skipped or [])


def replay_picks(prompts: list, fraction: float, n_rows: int, seed: int) -> list:
    """The prompts of the replay rows to mix into `n_rows` training rows so that they make up
    `fraction` of the mix: taken in a seeded order, repeated when more rows are needed than
    there are prompts."""
    if not prompts:
        return []
    n = max(1, round(fraction / (1 - fraction) * n_rows))
    order = list(range(len(prompts)))
    random.Random(f"{seed}:replay").shuffle(order)
    return [prompts[order[k % len(order)]] for k in range(n)]


def replay_conversations(picks: list, replies: dict) -> list[Conversation]:
    """Replay rows: each picked prompt with the base model's reply to it."""
    out = []
    for p in picks:
        reply = replies[p.id]
        msgs = (*p.prompt, {"role": "assistant", "content": reply.text.strip()})
        meta = {"replay": True, "cluster": "replay", "cut": not reply.ended}
        out.append(Conversation(msgs, f"replay:{p.source or p.id}", meta))
    return out


def add_replay(tokenizer, data: Data, convs: list[Conversation], cfg: DataConfig) -> Data:
    """`data` with the replay rows appended to its training rows (never to validation). A
    generated reply the chat template cannot render with a stable prefix is left out, and
    counted among the dropped rows."""
    rows, stats = tokenize(tokenizer, convs, cfg, [])  # unrenderable: counted in dropped
    data.train = data.train + rows
    s = data.stats
    s.replay_rows, s.replay_tokens = len(rows), stats.tokens
    s.rows, s.tokens = s.rows + len(rows), s.tokens + stats.tokens
    s.trained_tokens += stats.trained_tokens
    s.truncated += stats.truncated
    for reason, count in stats.dropped.items():
        s.dropped[f"replay: {reason}"] = count
    return data


def _length(row) -> int:
    width = getattr(row, "width", None)
    return row.tokens if width is None else width


def length_grouped_batches(
    rows: list, batch_size: int, seed: int, epoch: int = 0
) -> list[list[int]]:
    """Shuffle, then sort by length within windows of 32 batches so padding stays small, then
    shuffle the batch order. Deterministic in (seed, epoch). A row's length is its `width`
    where it has one (a pair: its prompt and longer reply, the width both its sequences are
    padded to), else its `tokens`."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: _length(rows[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_right(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one padded-batch builder: (token ids, mask) rows, right-padded to the longest, as
    (input_ids with pad_id on padding, attention_mask 1 on real tokens, the rows' masks as
    bool, False on padding). Training batches, packed batches and scoring all build on it."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row_ids, row_mask) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n] = torch.tensor(row_ids, dtype=torch.long)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(row_mask, dtype=torch.bool)
    return ids, attn, mask


def labels_from(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets: the ids where the mask is set, -100 (ignored) elsewhere."""
    return torch.where(mask, ids, torch.tensor(-100))


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. labels are -100 where the mask is 0 and on padding."""
    ids, attn, mask = pad_right([(r.input_ids, r.mask) for r in rows], pad_id)
    labels = labels_from(ids, mask)
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels, "real_tokens": attn.sum()}
    if any(r.replay for r in rows):  # the tokens of replay rows (train.kl_to_base)
        batch["replay_mask"] = torch.tensor([r.replay for r in rows]).unsqueeze(1) & attn.bool()
    return batch
