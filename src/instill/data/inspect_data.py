"""`instill data inspect`: what the model will be trained on, before training on it."""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table
from rich.text import Text

from instill.config import DataConfig, ModelConfig, SourceConfig, load_recipe
from instill.console import out
from instill.data.dataset import Row, build_data, length_grouped_batches
from instill.data.packing import pack_best_fit, packing_efficiency
from instill.models import load_tokenizer, resolve_model


def histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of equal width covering the lengths."""
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - lo) // width, bins - 1)] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts) if c]


def padding_efficiency(rows: list[Row], batch_size: int = 8) -> float:
    """Real tokens / padded tokens with length-grouped batches of `batch_size`."""
    real = padded = 0
    for idx in length_grouped_batches(rows, batch_size, seed=0):
        lens = [len(rows[i].input_ids) for i in idx]
        real += sum(lens)
        padded += max(lens) * len(lens)
    return real / padded if padded else 0.0


def _show_row(tokenizer, row: Row, n: int) -> None:
    text = Text()
    for tid, m in zip(row.input_ids, row.mask, strict=True):
        piece = tokenizer.decode([tid])
        text.append(piece, style="bold green" if m else "dim")
    out.print(
        f"[bold]row {n}[/bold] ({row.source}, {len(row.input_ids)} tokens, "
        f"{row.trained} trained; [bold green]trained[/bold green] / [dim]masked[/dim])"
    )
    out.print(text)
    out.print()


def _preference_file(source: str) -> str | None:
    """ "dpo" for a file of pairs, "kto" for one of labelled replies (from its first row's keys),
    None for supervised data."""
    from instill.data.sources import read_source

    first = next(iter(read_source(source, "train", [])), None)
    keys = set(first.data) if first is not None else set()
    if {"chosen", "rejected"} <= keys:
        return "dpo"
    if {"prompt", "completion"} <= keys and isinstance(first.data.get("label"), bool):
        return "kto"
    return None


def inspect_data(source: str, *, model: str, show_rows: int, max_length: int) -> dict:
    path = Path(source)
    objective = None
    holdout: frozenset[str] = frozenset()
    if path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path)
        data_cfg, model_cfg = recipe.data, recipe.model
        # what training will see: the held-out clusters' rows are not among it
        holdout = frozenset(recipe.eval.holdout_clusters)
        if recipe.train.objective != "sft":
            objective = recipe.train.objective
    else:
        data_cfg = DataConfig(sources=[SourceConfig(path=source)], max_length=max_length)
        model_cfg = ModelConfig(name=model)
        objective = _preference_file(source)
    tokenizer = load_tokenizer(resolve_model(model_cfg.name).path, model_cfg)
    if objective is not None:
        return inspect_preferences(tokenizer, data_cfg, objective, source, show_rows)
    start = time.perf_counter()
    data = build_data(tokenizer, data_cfg, holdout=holdout)
    rows, stats = data.train, data.stats
    elapsed = time.perf_counter() - start
    lengths = [len(r.input_ids) for r in rows]
    report = {
        "formats": stats.formats,
        "rows_in": stats.rows_in,
        "rows": stats.rows,
        "dropped": stats.dropped,
        "skipped": stats.skipped,
        "validation_rows": stats.validation_rows,
        "held_out": stats.held_out,
        "truncated": stats.truncated,
        "tokens": stats.tokens,
        "trained_tokens": stats.trained_tokens,
        "trained_fraction": round(stats.trained_tokens / max(stats.tokens, 1), 4),
        "padding_efficiency_batch8": round(padding_efficiency(rows), 4),
        "packing_efficiency": round(
            packing_efficiency(rows, pack_best_fit(rows, data_cfg.max_length), data_cfg.max_length),
            4,
        ),
        "length": {
            "min": min(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "max": max(lengths),
        },
        "histogram": [list(b) for b in histogram(lengths)],
        "rows_per_s": round(stats.rows_in / elapsed, 1) if elapsed else None,
        "max_length": data_cfg.max_length,
        # replay rows are the base model's replies, generated when training starts
        "replay_fraction": data_cfg.replay.fraction if data_cfg.replay else 0.0,
    }
    if show_rows:
        table = Table(title=f"data: {source}", show_header=False)
        for key in (
            "formats",
            "rows_in",
            "rows",
            "dropped",
            "skipped",
            "validation_rows",
            "held_out",
            "truncated",
            "tokens",
            "trained_tokens",
            "trained_fraction",
            "padding_efficiency_batch8",
            "packing_efficiency",
            "length",
            "rows_per_s",
        ):
            table.add_row(key, str(report[key]))
        if report["replay_fraction"]:
            table.add_row(
                "replay_fraction",
                f"{report['replay_fraction']} (base-model replies added when training starts; "
                "not in these counts)",
            )
        out.print(table)
        peak = max(c for _, _, c in histogram(lengths))
        out.print("[bold]length histogram (tokens)[/bold]")
        for low, high, count in histogram(lengths):
            out.print(f"{low:>6}-{high:<6} {'█' * max(1, round(40 * count / peak))} {count}")
        out.print()
        for n, row in enumerate(rows[:show_rows]):
            _show_row(tokenizer, row, n)
    return report


def _mean(xs: list[int]) -> float:
    return round(sum(xs) / len(xs), 1) if xs else 0.0


def inspect_preferences(tokenizer, data_cfg, objective: str, source: str, show_rows: int) -> dict:
    """The preference side of `data inspect`: pairs (or labelled rows), their reply lengths and
    the data's own length bias (how often the chosen reply is the longer one: DPO on data
    where it usually is teaches longer replies)."""
    from instill.data.preference_data import build_preference_data

    data = build_preference_data(tokenizer, data_cfg, objective)
    rows, stats = data.train, data.stats
    pairs = objective != "kto"
    report = {
        "objective": objective,
        "formats": stats.formats,
        "rows_in": stats.rows_in,
        "pairs" if pairs else "labelled_rows": stats.rows,
        "skipped": stats.skipped,
        "validation_rows": stats.validation_rows,
        "truncated": stats.truncated,
        "tokens": stats.tokens,
        "trained_tokens": stats.trained_tokens,
        "prompt_tokens_mean": _mean([len(r.prompt_ids) for r in rows]),
        "max_length": data_cfg.max_length,
    }
    if pairs:
        chosen, rejected = [len(r.chosen_ids) for r in rows], [len(r.rejected_ids) for r in rows]
        longer = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        report.update(
            chosen_tokens_mean=_mean(chosen),
            rejected_tokens_mean=_mean(rejected),
            chosen_longer_share=round(longer / len(rows), 4),
        )
    else:
        report["desirable_share"] = round(sum(r.desirable for r in rows) / len(rows), 4)
    if show_rows:
        table = Table(title=f"preference data: {source}", show_header=False)
        for key, value in report.items():
            table.add_row(key, str(value))
        out.print(table)
        for n, row in enumerate(rows[:show_rows]):
            _show_preference(tokenizer, row, n)
    return report


def _show_preference(tokenizer, row, n: int) -> None:
    out.print(f"[bold]row {n}[/bold] ({row.source}); [dim]prompt[/dim]")
    out.print(Text(tokenizer.decode(row.prompt_ids), style="dim"))
    replies = (
        [("chosen", row.chosen_ids, "bold green"), ("rejected", row.rejected_ids, "bold red")]
        if hasattr(row, "chosen_ids")
        else [("desirable" if row.desirable else "undesirable", row.completion_ids, "bold")]
    )
    for label, ids, style in replies:
        out.print(f"[{style}]{label}[/{style}] ({len(ids)} tokens)")
        out.print(Text(tokenizer.decode(ids), style=style))
    out.print()
