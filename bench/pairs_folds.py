"""Held-out preference over every prompt of a pair file: k folds split by prompt, one run per
fold, each measured on its own held-out fold, the per-pair results pooled.

One held-out split of the AlpacaEval pairs has 32 prompts, which leaves 95% intervals of +-6
to +-13 points on a change in accuracy. Training one run per fold (the same recipe, each fold
held out once) measures every one of the file's prompts on a model that never saw it, and the
pooled interval resamples all of them. What it measures is the recipe, not one model.

    python bench/pairs_folds.py split PAIRS.jsonl --folds 5 --out DIR [--first HELDOUT.jsonl]
        writes DIR/train{k}.jsonl and DIR/heldout{k}.jsonl, split by prompt (seed 0); with
        --first, fold 0 is that file's prompts (e.g. a run's own `data.validation` split) and
        the others split the rest
    python bench/pairs_folds.py pool FOLD [FOLD ...] [--json OUT]
        FOLD is AFTER or BEFORE,AFTER: folders of `instill eval-pairs` results (or runs, for
        their eval/preference.json), one per fold. AFTER alone: its model against its own
        start. BEFORE,AFTER: AFTER's model against BEFORE's, both against AFTER's reference
        (as `instill compare BEFORE AFTER`), e.g. a start and its tuned model each measured
        against a third model. Prints the pooled table; intervals resample prompts.

Folds must not share a prompt (refused otherwise). Each fold pairs its two results as
`instill compare` does (the same tokenised pairs, else refused).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from instill.errors import InstillError
from instill.eval.preference import (
    pair_preference,
    preference_folder,
    preference_summary,
    print_preference,
    read_preference,
    side_records,
)


def split(pairs: Path, folds: int, out: Path, first: Path | None, seed: int = 0) -> None:
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    prompts = sorted({r["prompt"] for r in rows})
    held: list[set] = []
    if first is not None:
        fixed = {json.loads(line)["prompt"] for line in first.read_text().splitlines() if line}
        held.append(fixed)
        prompts = [p for p in prompts if p not in fixed]
    random.Random(seed).shuffle(prompts)
    rest, n = folds - len(held), len(prompts)
    for k in range(rest):
        held.append(set(prompts[k * n // rest : (k + 1) * n // rest]))
    out.mkdir(parents=True, exist_ok=True)
    for k, fold in enumerate(held):
        with (out / f"heldout{k}.jsonl").open("w") as h, (out / f"train{k}.jsonl").open("w") as t:
            for r in rows:
                (h if r["prompt"] in fold else t).write(json.dumps(r) + "\n")
        print(f"fold {k}: {len(fold)} prompts held out")


def _sides(spec: str) -> tuple[list[dict], list[dict] | None, list[dict] | None, dict]:
    """(model, reference, start) records of one fold and its summary's names."""
    parts = spec.split(",")
    folders = []
    for name in parts:
        folder = preference_folder(name)
        if folder is None:
            raise InstillError(f"{name}: no preference.json (instill eval-pairs writes it)")
        folders.append(folder)
    if len(folders) == 2:
        summary = pair_preference(*folders)
        _, after = read_preference(folders[1])
        _, before = read_preference(folders[0])
        return (side_records(after, "model"), side_records(after, "reference"),
                side_records(before, "model"), summary)  # fmt: skip
    summary, records = read_preference(folders[0])
    return (side_records(records, "model"), side_records(records, "reference"),
            side_records(records, "start"), summary)  # fmt: skip


def pool(specs: list[str]) -> dict:
    model, reference, start, seen, names, refs = [], [], [], {}, [], []
    for k, spec in enumerate(specs):
        m, r, s, summary = _sides(spec)
        if k and summary.get("reference") != refs[0]:
            raise InstillError(f"{spec}: reference {summary.get('reference')!r}, fold 0's "
                               f"{refs[0]!r}; pool folds measured against one model")  # fmt: skip
        refs.append(summary.get("reference"))
        prompts = {x["prompt"] for x in m}
        shared = prompts & set(seen)
        if shared:
            raise InstillError(f"{spec} shares {len(shared)} prompts with fold {seen[min(shared)]}")
        seen |= dict.fromkeys(prompts, k)
        if k == 0:  # fold 0 decides which sides are pooled; every other fold must have them
            reference, start = (reference if r else None), (start if s else None)
        for name, side, got in (("model", model, m), ("reference", reference, r),
                                ("start", start, s)):  # fmt: skip
            if (side is None) != (got is None):
                raise InstillError(
                    f"{spec}: its {name} side differs from fold 0's (has one: "
                    f"{got is not None}); measure every fold the same way"
                )
            if side is not None:
                side.extend({**x, "id": f"{k}:{x['id']}"} for x in got)
        names.append(str(summary.get("model")))
    out = preference_summary(model, reference or None, start or None)
    return out | {"pairs": f"{len(specs)} folds", "model": "; ".join(names),
                  "start": "each fold's start" if start else None,
                  "reference": refs[0] if reference else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("pairs", type=Path)
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--first", type=Path)
    q = sub.add_parser("pool")
    q.add_argument("folds", nargs="+")
    q.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    try:
        if a.cmd == "split":
            split(a.pairs, a.folds, a.out, a.first)
            return 0
        summary = pool(a.folds)
    except InstillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console

    print_preference(summary, Console(width=120))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
