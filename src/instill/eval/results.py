"""Reading evaluation results back: the one reader of what eval.runner.write_result writes.

    <folder>/<stem>.json    the suite's summary (metric, score, intervals, clusters, ...)
    <folder>/<stem>.jsonl   one record per example (id, prompt, prediction, score, ...)

A run directory keeps its own before/after in eval/ (written by the training run only): the
tuned model's under the suite's name, the base model's with the prefix base-. A later
`instill eval RUN` writes beside them, to evals/<name>/, and never over them unless asked by name
(--replace-run-results). Compare, the run report, the transfer report and evaluation's reuse of
finished suites all read through here, and pair two sides' records only when check_same_split
finds them drawn the same way.

The pair is two atomic writes, records first; the summary holds the records file's sha256
(RECORDS_SHA256), so a kill between the two (new records beside the old summary) is a pair that
reading refuses (MismatchedResult) rather than a score of one evaluation beside the examples of
another. Summaries written before this key existed are read as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from instill import rundir
from instill.errors import InstillError
from instill.jsonl import read_jsonl
from instill.rundir import RunDir

BASE_PREFIX = "base-"
RECORDS_SHA256 = "records_sha256"
PREFERENCE = "preference"  # <folder>/preference.json(l): held-out pairs (eval/preference.py)
RUN_RESULTS = rundir.RESULTS  # <run>/eval/: the run's own before/after (compare, report)
EVALUATIONS = rundir.EVALUATIONS  # <run>/evals/<name>/: later evaluations (instill eval RUN)


class MismatchedResult(InstillError):
    """A summary beside records it was not written with: an evaluation cut short."""


def records_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_of(model: str) -> Path | None:
    """The run directory `model` names (a run, or its final/), else None."""
    run = RunDir.of(model)
    return run.root if run is not None else None


def evaluation_folder(run_dir: Path, name: str) -> Path:
    """<run>/evals/<name>/, for a name that is one plain folder name."""
    return RunDir(run_dir).evaluation(name)


def check_same_split(a: dict, b: dict, where_a: str, where_b: str) -> None:
    """Refuse to pair two results whose examples were drawn differently (per family, seed,
    held-out clusters, max examples, ...): their records would pair the wrong examples, or mark
    the same cluster seen on one side and unseen on the other. A result written before splits
    were recorded is checked on its held-out clusters only."""
    sa, sb = a.get("split"), b.get("split")
    if sa is not None and sb is not None:
        keys = sorted(set(sa) | set(sb))
        diff = [f"{k} {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys if sa.get(k) != sb.get(k)]
    else:
        ha, hb = a.get("holdout_clusters") or [], b.get("holdout_clusters") or []
        diff = [] if sorted(ha) == sorted(hb) else [f"holdout_clusters {ha!r} vs {hb!r}"]
    if diff:
        raise InstillError(
            f"{where_a} and {where_b} were evaluated on different splits ({'; '.join(diff)}), "
            "so their records cannot be paired; evaluate both with the same split (instill eval "
            "RUN uses the run's own split unless --per-family, --seed, --holdout or "
            "--max-examples say otherwise)"
        )


def read_summary(folder: Path, stem: str) -> dict | None:
    """<folder>/<stem>.json, or None when that suite was not evaluated; MismatchedResult when
    <stem>.jsonl beside it is not the records it was written with."""
    path = Path(folder) / f"{stem}.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InstillError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); it is an evaluation summary: "
            "evaluate that suite again to rewrite it"
        ) from None
    if isinstance(summary, dict):
        recorded, records = summary.pop(RECORDS_SHA256, None), path.with_suffix(".jsonl")
        if recorded is not None and records.is_file() and records_sha256(records) != recorded:
            raise MismatchedResult(
                f"{path} and {records} do not belong together (the records were rewritten "
                "after this summary: an evaluation was cut short between the two files); "
                f"evaluate that suite again into {path.parent} to rewrite both"
            )
    return summary


def read_records(folder: Path, stem: str) -> list[dict] | None:
    """<folder>/<stem>.jsonl's records, or None when that suite was not evaluated;
    MismatchedResult when the summary beside them was written with other records."""
    path = Path(folder) / f"{stem}.jsonl"
    if not path.is_file():
        return None
    read_summary(folder, stem)  # the pair's check
    return read_jsonl(path)


def result_stems(folder: Path, prefix: str = "") -> list[str]:
    """The suites with both a summary and records in `folder` whose files start with `prefix`,
    named without it, sorted. With no prefix the base model's results (base-*) are left out, and
    so are held-out pairs' (preference.json: one summary holding its own before and after, not
    a suite of scored examples)."""
    names = []
    for p in sorted(Path(folder).glob(f"{prefix}*.json")):
        stem = p.stem.removeprefix(prefix)
        if (not prefix and stem.startswith(BASE_PREFIX)) or p.stem == PREFERENCE:
            continue
        if p.with_suffix(".jsonl").is_file():
            names.append(stem)
    return names


def all_summaries(folder: Path) -> dict[str, dict]:
    """Every summary in `folder` (base and tuned), by file stem; {} when there is no folder."""
    return {p.stem: read_summary(p.parent, p.stem) for p in sorted(Path(folder).glob("*.json"))}
