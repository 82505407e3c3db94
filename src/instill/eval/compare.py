"""Compare two sets of evaluation results, per suite and cluster, with the confidence interval of
each delta (paired bootstrap over the examples both sides scored).

A side is a folder of <suite>.json/.jsonl results (what `instill eval` writes), or a run
directory: its eval/ folder holds the tuned model's results and, with the prefix base-, the base
model's. `instill compare RUN` alone compares a run's base with its tuned model;
`--eval NAME` takes the tuned side from a later evaluation of the run (evals/NAME/). Two sides
are paired suite by suite only when they were evaluated on the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instill.errors import InstillError
from instill.eval.metrics import bootstrap_ci, bootstrap_delta_ci, bootstrap_ratio_ci
from instill.eval.results import (
    BASE_PREFIX,
    RUN_RESULTS,
    check_same_split,
    evaluation_folder,
    read_records,
    read_summary,
    result_stems,
)


@dataclass(frozen=True)
class Side:
    label: str
    folder: Path
    prefix: str = ""

    def suites(self) -> list[str]:
        return result_stems(self.folder, self.prefix)

    def records(self, suite: str) -> list[dict]:
        return read_records(self.folder, f"{self.prefix}{suite}") or []

    def summary(self, suite: str) -> dict:
        return read_summary(self.folder, f"{self.prefix}{suite}") or {}

    def where(self, suite: str | None = None) -> str:
        """The results this side reads: one suite's summary file, or the folder (and prefix)."""
        if suite is None:
            return f"{self.folder}/{self.prefix}*" if self.prefix else f"{self.folder}/"
        return str(self.folder / f"{self.prefix}{suite}.json")


def sides(a: str, b: str | None, evaluation: str | None = None) -> tuple[Side, Side]:
    """A alone: a run's base (eval/base-*) against its tuned model: the run's own results, or
    with `evaluation` a later `instill eval` of it (evals/<name>/). A and B: two result folders
    (a run directory stands for its own eval/)."""
    pa = Path(a)
    if b is None:
        folder = pa / RUN_RESULTS if (pa / RUN_RESULTS).is_dir() else pa
        if not list(folder.glob(f"{BASE_PREFIX}*.json")):
            raise InstillError(
                f"{a}: no base-model results ({RUN_RESULTS}/{BASE_PREFIX}*.json) to compare "
                "with; give two result folders: instill compare BASE TUNED"
            )
        if evaluation is None:
            return Side("base", folder, BASE_PREFIX), Side("tuned", folder)
        tuned = evaluation_folder(pa, evaluation)
        if not Side("tuned", tuned).suites():
            found = sorted(p.name for p in tuned.parent.glob("*") if p.is_dir())
            raise InstillError(
                f"--eval {evaluation}: no results in {tuned} (evaluations of this run: "
                f"{', '.join(found) or 'none'})"
            )
        return Side("base", folder, BASE_PREFIX), Side("tuned", tuned)
    if evaluation is not None:
        raise InstillError("--eval names an evaluation of one run: give only that run (A)")
    out = []
    for name in (a, b):
        p = Path(name)
        folder = p / RUN_RESULTS if (p / RUN_RESULTS).is_dir() else p
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


def _paired(ra: list[dict], rb: list[dict]) -> tuple[list[dict], list[dict]]:
    """The records both sides have (by id), in A's order."""
    by_id = {r.get("id"): r for r in rb}
    both = [r for r in ra if r.get("id") in by_id]
    return both, [by_id[r["id"]] for r in both]


def generation_change(ra: list[dict], rb: list[dict], moved: int = 3) -> dict:
    """A drift suite, A against B over the prompts both answered: drift from the base model,
    reply length (ratio of tokens), share of short replies, ROUGE-L where there are references,
    and the prompts whose drift grew most, with both replies."""
    from instill.eval.drift import SHORT_WORDS

    a, b = _paired(ra, rb)
    toks_a, toks_b = [r["tokens"] for r in a], [r["tokens"] for r in b]
    short_a = [float(r["words"] < SHORT_WORDS) for r in a]
    short_b = [float(r["words"] < SHORT_WORDS) for r in b]
    n = len(a)
    out = {
        "n": n,
        "same_anchor": {r.get("anchor") for r in a + b} == {a[0].get("anchor")} if n else True,
        "drift": _row("drift", a, b),
        "tokens": (
            sum(toks_a) / n if n else None,
            sum(toks_b) / n if n else None,
            sum(toks_b) / max(1, sum(toks_a)) if n else None,
            bootstrap_ratio_ci(toks_b, toks_a) if n else None,
        ),
        "short": (
            sum(short_a) / n if n else None,
            sum(short_b) / n if n else None,
            (sum(short_b) - sum(short_a)) / n if n else None,
            bootstrap_delta_ci(short_a, short_b, paired=True) if n else None,
        ),
        "base_cut": _cut(a, b),
        "rouge_l": None,
        "moved": [],
    }
    if n and all("rouge_l" in r.get("scores", {}) for r in a + b):
        score = lambda rs: [{"id": r["id"], "score": r["scores"]["rouge_l"]} for r in rs]  # noqa: E731
        out["rouge_l"] = _row("ROUGE-L", score(a), score(b))
    order = sorted(range(n), key=lambda i: b[i]["score"] - a[i]["score"], reverse=True)
    out["moved"] = [
        {
            "prompt": b[i]["prompt"],
            "a": a[i]["prediction"],
            "b": b[i]["prediction"],
            "drift_change": b[i]["score"] - a[i]["score"],
        }
        for i in order[:moved]
    ]
    return out


def _cut(a: list[dict], b: list[dict]) -> tuple[int, int | None]:
    """How many of A's replies were cut at the generation cap, and the cap (the length of any
    reply on either side cut there; None when none was): the upper length guard's headroom."""
    cut = [r["tokens"] for r in a + b if r.get("finish_reason") == "length"]
    return sum(r.get("finish_reason") == "length" for r in a), max(cut) if cut else None


def compare_suite(sa: Side, sb: Side, suite: str) -> dict:
    """Rows: overall, seen and unseen clusters (when some were held out), then each cluster.
    A drift suite adds `generation` (generation_change) and its rows are drift per kind.
    Refuses two sides evaluated on different splits (results.check_same_split)."""
    check_same_split(sa.summary(suite), sb.summary(suite), sa.where(suite), sb.where(suite))
    ra, rb = sa.records(suite), sb.records(suite)
    if sb.summary(suite).get("metric") == "drift":
        rows = [_row("overall", ra, rb)]
        for c in sorted({r.get("cluster") or "" for r in ra + rb} - {""}):
            rows.append(
                _row(
                    f"  {c}",
                    [r for r in ra if r.get("cluster") == c],
                    [r for r in rb if r.get("cluster") == c],
                )
            )
        return {
            "suite": suite,
            "metric": "drift",
            "rows": rows,
            "generation": generation_change(ra, rb),
        }
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


def compare(
    a: str, b: str | None = None, evaluation: str | None = None
) -> tuple[Side, Side, list[dict]]:
    sa, sb = sides(a, b, evaluation)
    common = [s for s in sa.suites() if s in set(sb.suites())]
    if not common:
        raise InstillError(
            f"no suite evaluated on both sides ({sa.folder}: {', '.join(sa.suites()) or 'none'}; "
            f"{sb.folder}: {', '.join(sb.suites()) or 'none'})"
        )
    return sa, sb, [compare_suite(sa, sb, s) for s in common]


def _generation_json(gen: dict) -> dict:
    from instill.eval.drift import generation_losses

    d, r = gen["drift"], gen["rouge_l"]
    ta, tb, ratio, ci = gen["tokens"]
    sa, sb, delta, sci = gen["short"]
    return {
        "n": gen["n"],
        "same_anchor": gen["same_anchor"],
        "drift": {"a": d.a, "b": d.b, "delta": d.delta, "delta_ci95": list(d.ci or ())},
        "tokens": {"a": ta, "b": tb, "ratio": ratio, "ratio_ci95": list(ci or ())},
        "short_share": {"a": sa, "b": sb, "delta": delta, "delta_ci95": list(sci or ())},
        "base_cut": {"replies": gen["base_cut"][0], "at_tokens": gen["base_cut"][1]},
        "rouge_l": None
        if r is None
        else {"a": r.a, "b": r.b, "delta": r.delta, "delta_ci95": list(r.ci or ())},
        "losses": generation_losses(gen),
        "moved": gen["moved"],
    }


def as_json(sa: Side, sb: Side, tables: list[dict]) -> dict:
    return {
        "a": sa.where(),
        "b": sb.where(),
        "suites": [
            {
                "suite": t["suite"],
                "metric": t["metric"],
                **({"generation": _generation_json(t["generation"])} if "generation" in t else {}),
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


def _print_generation(sa: Side, sb: Side, t: dict, out) -> None:
    from rich.table import Table

    gen = t["generation"]
    if not gen["n"]:
        out.print(f"{t['suite']}: no prompt was answered on both sides")
        return
    from instill.eval.drift import limit_cells

    limit = limit_cells()
    table = Table(title=f"{t['suite']}: against the base model's replies (n={gen['n']})")
    for col in ("", sa.label, sb.label, "change", "95% CI", "limit"):
        table.add_column(col, justify="left" if not col else "right")
    for r in t["rows"]:
        overall = r.label == "overall"  # the verdict weighs the overall drift, not each kind's
        table.add_row(
            f"drift, nats/token {r.label.strip()}" if overall else r.label,
            f"{r.a:.3f}",
            f"{r.b:.3f}",
            f"{r.delta:+.3f}" + (" *" if r.significant else ""),
            f"{r.ci[0]:+.3f} … {r.ci[1]:+.3f}",
            limit["drift"] if overall else "",
            style="bold" if not r.label.startswith(" ") else None,
        )
    ta, tb, ratio, ci = gen["tokens"]
    table.add_row("reply tokens (mean)", f"{ta:.1f}", f"{tb:.1f}", f"x{ratio:.2f}",
                  f"x{ci[0]:.2f} … x{ci[1]:.2f}", limit["tokens"], style="bold")  # fmt: skip
    sa_, sb_, delta, sci = gen["short"]
    table.add_row(
        "replies under 10 words (%)",
        f"{100 * sa_:.1f}",
        f"{100 * sb_:.1f}",
        f"{100 * delta:+.1f}",
        f"{100 * sci[0]:+.1f} … {100 * sci[1]:+.1f}",
        limit["short"],
        style="bold",
    )
    r = gen["rouge_l"]
    if r is not None:
        table.add_row("ROUGE-L vs references (%)", f"{100 * r.a:.1f}", f"{100 * r.b:.1f}",
                      f"{100 * r.delta:+.1f}", f"{100 * r.ci[0]:+.1f} … {100 * r.ci[1]:+.1f}",
                      limit["rouge_l"], style="bold")  # fmt: skip
    out.print(table)
    if not gen["same_anchor"]:
        out.print("note: the two sides were scored against different base models' replies")


def print_tables(sa: Side, sb: Side, tables: list[dict], out) -> None:
    from rich.table import Table

    out.print(f"{sa.label}: {sa.where()}\n{sb.label}: {sb.where()}", highlight=False)
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for t in tables:
        if "generation" in t:
            _print_generation(sa, sb, t, out)
            continue
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
