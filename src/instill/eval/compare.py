"""Compare two sets of evaluation results, per suite and cluster, with the confidence interval of
each delta (paired bootstrap over the examples both sides scored).

A side is a folder of <suite>.json/.jsonl results (what `instill eval` writes), or a run
directory: its eval/ folder holds the tuned model's results and, with the prefix base-, the base
model's. `instill compare RUN` alone compares a run's base with its tuned model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from instill.errors import InstillError
from instill.eval.metrics import bootstrap_ci, bootstrap_delta_ci


@dataclass(frozen=True)
class Side:
    label: str
    folder: Path
    prefix: str = ""

    def suites(self) -> list[str]:
        names = []
        for p in sorted(self.folder.glob(f"{self.prefix}*.json")):
            stem = p.stem.removeprefix(self.prefix)
            if not self.prefix and stem.startswith("base-"):
                continue
            if p.with_suffix(".jsonl").is_file():
                names.append(stem)
        return names

    def records(self, suite: str) -> list[dict]:
        path = self.folder / f"{self.prefix}{suite}.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def summary(self, suite: str) -> dict:
        return json.loads((self.folder / f"{self.prefix}{suite}.json").read_text())


def sides(a: str, b: str | None) -> tuple[Side, Side]:
    pa = Path(a)
    if b is None:
        folder = pa / "eval" if (pa / "eval").is_dir() else pa
        if not list(folder.glob("base-*.json")):
            raise InstillError(
                f"{a}: no base-model results (eval/base-*.json) to compare with; give two "
                "result folders: instill compare BASE TUNED"
            )
        return Side("base", folder, "base-"), Side("tuned", folder)
    out = []
    for name in (a, b):
        p = Path(name)
        folder = p / "eval" if (p / "eval").is_dir() else p
        if not folder.is_dir() or not Side(name, folder).suites():
            raise InstillError(f"{name}: no evaluation results (<suite>.json and .jsonl) found")
        out.append(Side(p.name or name, folder))
    return out[0], out[1]


@dataclass(frozen=True)
class Row:
    label: str
    a: float | None
    b: float | None
    n_a: int
    n_b: int
    delta: float | None
    ci: tuple[float, float] | None
    paired: bool
    ci_a: tuple[float, float] | None = None  # each side's own 95% interval
    ci_b: tuple[float, float] | None = None

    @property
    def significant(self) -> bool:
        return self.ci is not None and (self.ci[0] > 0 or self.ci[1] < 0)


def _row(label: str, ra: list[dict], rb: list[dict]) -> Row:
    mean = lambda rs: sum(r["score"] for r in rs) / len(rs) if rs else None  # noqa: E731
    a, b = mean(ra), mean(rb)
    ci_a = bootstrap_ci([r["score"] for r in ra]) if ra else None
    ci_b = bootstrap_ci([r["score"] for r in rb]) if rb else None
    if a is None or b is None:
        return Row(label, a, b, len(ra), len(rb), None, None, False, ci_a, ci_b)
    ida, idb = [r.get("id") for r in ra], [r.get("id") for r in rb]
    paired = None not in ida and sorted(ida) == sorted(idb) and len(set(ida)) == len(ida)
    if paired:
        by_id = {r["id"]: r["score"] for r in rb}
        xs = [r["score"] for r in ra]
        ys = [by_id[r["id"]] for r in ra]
        ci = bootstrap_delta_ci(xs, ys, paired=True)
    else:
        ci = bootstrap_delta_ci([r["score"] for r in ra], [r["score"] for r in rb], paired=False)
    return Row(label, a, b, len(ra), len(rb), b - a, ci, paired, ci_a, ci_b)


def compare_suite(sa: Side, sb: Side, suite: str) -> dict:
    """Rows: overall, seen and unseen clusters (when some were held out), then each cluster."""
    ra, rb = sa.records(suite), sb.records(suite)
    rows = [_row("overall", ra, rb)]
    if any(r.get("seen") is False for r in ra + rb):
        for side, flag in (("seen clusters", True), ("unseen clusters", False)):
            rows.append(
                _row(
                    side,
                    [r for r in ra if r.get("seen", True) is flag],
                    [r for r in rb if r.get("seen", True) is flag],
                )
            )
    clusters = sorted({r.get("cluster") or "" for r in ra + rb} - {""})
    unseen = {r.get("cluster") for r in ra + rb if r.get("seen") is False}
    for c in clusters:
        tag = " (unseen)" if c in unseen else ""
        rows.append(
            _row(
                f"  {c}{tag}",
                [r for r in ra if r.get("cluster") == c],
                [r for r in rb if r.get("cluster") == c],
            )
        )
    summary = sb.summary(suite)
    return {"suite": suite, "metric": summary.get("metric", "score"), "rows": rows}


def compare(a: str, b: str | None = None) -> tuple[Side, Side, list[dict]]:
    sa, sb = sides(a, b)
    common = [s for s in sa.suites() if s in set(sb.suites())]
    if not common:
        raise InstillError(
            f"no suite evaluated on both sides ({sa.folder}: {', '.join(sa.suites()) or 'none'}; "
            f"{sb.folder}: {', '.join(sb.suites()) or 'none'})"
        )
    return sa, sb, [compare_suite(sa, sb, s) for s in common]


def as_json(sa: Side, sb: Side, tables: list[dict]) -> dict:
    return {
        "a": str(sa.folder / sa.prefix),
        "b": str(sb.folder / sb.prefix),
        "suites": [
            {
                "suite": t["suite"],
                "metric": t["metric"],
                "rows": [
                    {
                        "label": r.label.strip(),
                        "a": r.a,
                        "b": r.b,
                        "n": [r.n_a, r.n_b],
                        "delta": r.delta,
                        "delta_ci95": list(r.ci) if r.ci else None,
                        "significant": r.significant,
                        "paired": r.paired,
                    }
                    for r in t["rows"]
                ],
            }
            for t in tables
        ],
    }


def print_tables(sa: Side, sb: Side, tables: list[dict], out) -> None:
    from rich.table import Table

    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for t in tables:
        table = Table(title=f"{t['suite']}: {t['metric']} (%)")
        for col in ("", sa.label, sb.label, "delta", "delta 95% CI", "n"):
            table.add_column(col, justify="left" if not col else "right")
        for r in t["rows"]:
            ci = "—" if r.ci is None else f"{100 * r.ci[0]:+.1f} … {100 * r.ci[1]:+.1f}"
            delta = (
                "—"
                if r.delta is None
                else f"{100 * r.delta:+.1f}" + (" *" if r.significant else "")
            )
            table.add_row(
                r.label,
                pct(r.a),
                pct(r.b),
                delta,
                ci,
                str(r.n_b),
                style="bold" if not r.label.startswith(" ") else None,
            )
        out.print(table)
    out.print("* the delta's 95% interval excludes 0 (paired bootstrap over the same examples)")
