"""Reading evaluation results back: the one reader of what eval.runner.write_result writes.

    <folder>/<stem>.json    the suite's summary (metric, score, intervals, clusters, ...)
    <folder>/<stem>.jsonl   one record per example (id, prompt, prediction, score, ...)

A run directory keeps them in eval/: the tuned model's under the suite's name, the base model's
with the prefix base-. Compare, the run report, the transfer report and evaluation's reuse of
finished suites all read through here.
"""

from __future__ import annotations

import json
from pathlib import Path

from instill.errors import InstillError
from instill.jsonl import read_jsonl

BASE_PREFIX = "base-"


def read_summary(folder: Path, stem: str) -> dict | None:
    """<folder>/<stem>.json, or None when that suite was not evaluated."""
    path = Path(folder) / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InstillError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); it is an evaluation summary: "
            "evaluate that suite again to rewrite it"
        ) from None


def read_records(folder: Path, stem: str) -> list[dict] | None:
    """<folder>/<stem>.jsonl's records, or None when that suite was not evaluated."""
    path = Path(folder) / f"{stem}.jsonl"
    return read_jsonl(path) if path.is_file() else None


def result_stems(folder: Path, prefix: str = "") -> list[str]:
    """The suites with both a summary and records in `folder` whose files start with `prefix`,
    named without it, sorted. With no prefix the base model's results (base-*) are left out."""
    names = []
    for p in sorted(Path(folder).glob(f"{prefix}*.json")):
        stem = p.stem.removeprefix(prefix)
        if not prefix and stem.startswith(BASE_PREFIX):
            continue
        if p.with_suffix(".jsonl").is_file():
            names.append(stem)
    return names


def all_summaries(folder: Path) -> dict[str, dict]:
    """Every summary in `folder` (base and tuned), by file stem; {} when there is no folder."""
    return {p.stem: read_summary(p.parent, p.stem) for p in sorted(Path(folder).glob("*.json"))}
