"""A preference recipe's data: pair (or labelled) files -> tokenised rows, split by prompt.

    build_preference_data(tokenizer, data_cfg, objective) -> Data (train, validation: PairRow or
                                                            LabelledRow lists; stats; skipped)

The validation split holds out whole prompts: pair files often give several pairs per prompt
(the AlpacaEval pairs have three), and a prompt whose pairs sit on both sides would let
validation reward memorising the prompt. kto trains on labelled rows; a pair file given to kto
is split into two labelled rows per pair (chosen: desirable, rejected: undesirable), after the
split, so its held-out prompts' pairs are kept as pairs too (Data.validation_pairs: scored before
and after training as a pair method's are) beside their labelled rows (kto's validation loss).
The pair methods refuse labelled rows: they have no pairing.

Tokenising pairs is quick (about a second per thousand pairs here), so the data cache of
supervised recipes (data/cache.py) is not used for them.
"""

from __future__ import annotations

import json
import random

from instill.config import DataConfig
from instill.data.dataset import Data, _weighted
from instill.data.preference import FORMATS, Labelled, Pair, read_preferences, unpaired
from instill.data.preference_tokens import tokenize_preferences
from instill.errors import InstillError


def _prompt_key(item: Pair | Labelled) -> str:
    return json.dumps(item.prompt, sort_keys=True, ensure_ascii=False)


def split_by_prompt(items: list, fraction: float, seed: int, key: str) -> tuple[list, list]:
    """Hold out `fraction` of the distinct prompts (chosen by seed and source), with every row
    of each: (kept, held out), each in file order."""
    if fraction <= 0 or not items:
        return items, []
    prompts = list(dict.fromkeys(_prompt_key(i) for i in items))
    random.Random(f"{seed}:{key}").shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))])
    return (
        [i for i in items if _prompt_key(i) not in held],
        [i for i in items if _prompt_key(i) in held],
    )


def _read(path: str, fmt: str, split: str, skipped, columns, objective: str, what: str):
    if fmt not in ("auto", *FORMATS):
        raise InstillError(
            f"{what} {path}: format '{fmt}' is a supervised format, and train.objective: "
            f"{objective} trains on preference rows ({', '.join(FORMATS)}); use format: auto or "
            "one of those"
        )
    items, found = read_preferences(path, fmt, split, skipped, columns)
    if objective == "kto":
        return items, found
    labelled = next((i for i in items if isinstance(i, Labelled)), None)
    if labelled is not None:
        raise InstillError(
            f"{labelled.source}: a labelled row (prompt, completion, label) has no rejected "
            f"reply to pair it with, and train.objective: {objective} trains on pairs; use "
            "train.objective: kto for labelled rows"
        )
    return items, found


def _trained_as(items: list, objective: str) -> list:
    """The rows `objective` trains on: kto's labelled rows (each pair split in two), else the
    pairs as read."""
    if objective != "kto":
        return items
    return [i for i in items if isinstance(i, Labelled)] + unpaired(
        [i for i in items if isinstance(i, Pair)]
    )


def _pair_rows(tokenizer, pairs: list[Pair], max_length: int, skipped) -> list:
    """kto's held-out pairs, tokenised as a pair method's are (the same max_length policy). A
    pair that cannot be tokenised is left out; it was recorded already, through its replies'
    labelled rows (tokenised first: without data.on_error: skip they raised there)."""
    if not pairs:
        return []
    again = [] if skipped is not None else None  # (already in `skipped`)
    rows, _ = tokenize_preferences(tokenizer, pairs, max_length, again)
    return rows


def build_preference_data(tokenizer, cfg: DataConfig, objective: str) -> Data:
    skipped: list[dict] | None = [] if cfg.on_error == "skip" else None
    train_items: list = []
    val_items: list = []
    held_pairs: list[Pair] = []  # the validation split's pairs, as read (before kto's split)
    formats: dict[str, int] = {}
    flow = {"read": 0, "validation_split": 0, "weighted": 0}  # DataStats' fields of that name
    for k, src in enumerate(cfg.sources):
        where = f"data.sources[{k}]"
        items, fmt = _read(src.path, src.format, src.split, skipped, src.columns, objective, where)
        trained = _trained_as(items, objective)
        formats[fmt] = formats.get(fmt, 0) + len(trained)
        flow["read"] += len(trained)
        if isinstance(cfg.validation, float):  # whole prompts, before kto splits their pairs
            items, held = split_by_prompt(items, cfg.validation, cfg.seed, src.path)
            trained, held_rows = _trained_as(items, objective), _trained_as(held, objective)
            held_pairs += [i for i in held if isinstance(i, Pair)]
            val_items += held_rows
            flow["validation_split"] += len(held_rows)
        mixed = _weighted(trained, src.weight, cfg.seed, src.path)
        flow["weighted"] += len(mixed) - len(trained)
        train_items += mixed
    if isinstance(cfg.validation, str) and cfg.validation:
        items, _ = _read(
            cfg.validation, "auto", "validation", skipped, None, objective, "data.validation"
        )
        val_items = _trained_as(items, objective)
        held_pairs = [i for i in items if isinstance(i, Pair)]
    rows_in = len(train_items)
    if not train_items:
        raise InstillError(
            f"no preference rows to train on in data.sources ({len(skipped or [])} skipped)"
        )
    rows, stats = tokenize_preferences(tokenizer, train_items, cfg.max_length, skipped)
    val_rows = []
    if val_items:
        val_rows, _ = tokenize_preferences(tokenizer, val_items, cfg.max_length, skipped)
    pair_rows = val_rows  # a pair method's validation rows are its held-out pairs
    if objective == "kto":
        pair_rows = _pair_rows(tokenizer, held_pairs, cfg.max_length, skipped)
    stats.rows_in = rows_in
    for key, n in flow.items():
        setattr(stats, key, n)
    stats.formats = formats
    stats.validation_rows = len(val_rows)
    stats.skipped = len(skipped or [])
    if not rows:
        raise InstillError(
            f"no preference rows left out of {rows_in} ({stats.skipped} skipped); fix the data"
        )
    return Data(rows, val_rows, stats, skipped or [], validation_pairs=pair_rows)
