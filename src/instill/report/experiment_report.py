"""The transfer experiment's report: pretrained+tuned vs scratch+tuned vs pretrained untuned,
answering the four claims (better answers, less training, generalisation, cost) with a number
and a plot each, and saying plainly when a number does not support its claim. It opens with
what differed between the runs, from their records (report/arms.py); the recipe as shipped,
when the experiment ran it (experiment.py), is a fourth column beside the claims."""

from __future__ import annotations

from pathlib import Path

from instill.atomic import writing
from instill.eval.compare import Side, compare_suite
from instill.eval.results import result_stems
from instill.report import plots
from instill.report.arms import comparison
from instill.report.claims import (
    GENERAL,
    forgetting_verdict,
    is_guard,
    pct,
    row,
    training_costs,
    transfer_answers_claim,
    transfer_cost_claim,
    transfer_generalisation_claim,
    transfer_training_claim,
)
from instill.report.document import Document, Heading, Image, Para, Table, write
from instill.report.run_report import forgetting_blocks, load_run, suite_summary
from instill.rundir import RunDir

WAYS = ("pretrained, untuned", "scratch, tuned", "pretrained, tuned")
SHIPPED = "pretrained, tuned as shipped"  # the recipe as written, when it replays (experiment.py)


def _metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    from instill.report.plots import read_metrics

    return read_metrics(RunDir(run_dir).metrics)


def val_curve(run_dir: Path) -> list[tuple[int, int, float, float]]:
    """(step, tokens seen, seconds of training, validation loss), step 0 included."""
    train, val = _metrics(run_dir)
    out = []
    for v in sorted(val, key=lambda r: r["step"]):
        if "tokens" in v and "elapsed_s" in v:  # logged with the validation loss itself
            tokens, elapsed = v["tokens"], v["elapsed_s"]
        elif v["step"] == 0:
            tokens, elapsed = 0, 0.0
        else:  # older runs: the last training record at or before this step
            before = [r for r in train if r["step"] <= v["step"]]
            last = before[-1] if before else {"tokens": 0, "elapsed_s": 0.0}
            tokens, elapsed = last.get("tokens", 0), last.get("elapsed_s", 0.0)
        out.append((v["step"], tokens, elapsed, v["val_loss"]))
    return out


def steps_saved(pre: list, scratch: list) -> dict | None:
    """Where the pretrained start first reached the scratch model's best validation loss."""
    if not pre or not scratch:
        return None
    best = min(scratch, key=lambda p: p[3])
    reached = next((p for p in pre if p[3] <= best[3]), None)
    return {
        "scratch_best": best,
        "pretrained_reached": reached,
        "steps_saved": None if reached is None else best[0] - reached[0],
        "tokens_saved": None if reached is None else best[1] - reached[1],
        "seconds_saved": None if reached is None else best[2] - reached[2],
    }


def _suites(pre: Path, scratch: Path) -> list[str]:
    names = result_stems(RunDir(pre).results)
    return [s for s in names if (RunDir(scratch).results / f"{s}.json").is_file()]


def _score_cell(s: dict | None, key: str = "") -> str:
    if s is None:
        return "—"
    part = s.get(key) if key else s
    if part is None:
        return "—"
    lo, hi = part["ci95"]
    return f"{pct(part['score'])} ({pct(lo)}–{pct(hi)})"


def _forgetting(pre_dir: Path, tuned_dir: Path, who: str) -> list:
    """The forgetting verdict of one tuned pretrained run against the pretrained run's untuned
    results (the same weights on the same suites), on every guard scored on both."""
    untuned = Side("untuned", RunDir(pre_dir).results, "base-")
    tuned = Side("tuned", RunDir(tuned_dir).results)
    guards = [
        compare_suite(untuned, tuned, s) for s in tuned.suites() if s in set(untuned.suites())
    ]
    guards = [t for t in guards if is_guard(t)]
    if not guards:
        return []
    return [
        Heading(f"Forgetting: {who} before and after tuning", 3),
        forgetting_verdict(guards, who),
        *forgetting_blocks(guards, "untuned", "tuned"),
    ]


def _opening(folder: Path, shipped: bool) -> Para:
    """What differed between the compared runs, and the recipe as shipped against the
    pretrained run, from their records (report/arms.py)."""
    pre, scratch = folder / "pretrained", folder / "scratch"
    text = comparison(pre, scratch, "The pretrained and the scratch run differed")
    if shipped:
        text += " " + comparison(
            folder / "shipped",
            pre,
            "The recipe as shipped (its own column) differed from the pretrained run",
            say_same=False,
        )
    return Para(text)


def build_transfer_report(
    folder: Path, price_per_hour: float = 0.10, currency: str = "USD"
) -> Document:
    pre_dir, scratch_dir, shipped_dir = (
        folder / "pretrained",
        folder / "scratch",
        folder / "shipped",
    )
    pre, scratch = load_run(pre_dir), load_run(scratch_dir)
    shipped = load_run(shipped_dir) if RunDir(shipped_dir).record_file.is_file() else None
    names = WAYS + ((SHIPPED,) if shipped else ())
    suites = _suites(pre_dir, scratch_dir)
    ways = {
        s: (
            suite_summary(pre_dir, f"base-{s}"),
            suite_summary(scratch_dir, s),
            suite_summary(pre_dir, s),
            *((suite_summary(shipped_dir, s),) if shipped else ()),
        )
        for s in suites
    }
    vs_untuned = {
        s: compare_suite(
            Side("untuned", RunDir(pre_dir).results, "base-"),
            Side("tuned", RunDir(pre_dir).results),
            s,
        )
        for s in suites
    }
    vs_scratch = {
        s: compare_suite(
            Side("scratch", RunDir(scratch_dir).results), Side("tuned", RunDir(pre_dir).results), s
        )
        for s in suites
    }
    doc = Document(f"instill transfer experiment: {folder.name}")
    doc.add(_opening(folder, shipped is not None))
    doc.add(
        Para(
            f"Model **{pre['model']['name']}** ({pre['params']['total']:,} parameters), three "
            "ways: untuned; tuned from its pretrained weights; the same architecture tuned from "
            "random weights. The four claims compare these."
            + (
                f" The fourth column, {SHIPPED}, is the recipe as written (with the rows the "
                "comparison leaves out), beside the claims and not in them; its untuned scores "
                "are the pretrained run's."
                if shipped
                else ""
            )
            + " Intervals are 95% bootstrap intervals; a delta marked * excludes 0."
        )
    )
    doc.add(Heading("The four claims"))
    task_suites = [
        s for s in suites if s != GENERAL and (ways[s][2] or {}).get("metric") != "drift"
    ]

    pre_curve, scratch_curve = val_curve(pre_dir), val_curve(scratch_dir)
    shipped_curve = val_curve(shipped_dir) if shipped else []
    saved = steps_saved(pre_curve, scratch_curve)
    held = [s for s in task_suites if row(vs_untuned[s], "unseen clusters") is not None]
    costs = {
        "pretrained, tuned": training_costs(pre, price_per_hour),
        "scratch, tuned": training_costs(scratch, price_per_hour),
    }
    if shipped:
        costs[SHIPPED] = training_costs(shipped, price_per_hour)
    claim1 = transfer_answers_claim(task_suites, vs_untuned, vs_scratch)
    claim2 = transfer_training_claim(saved)
    claim3 = transfer_generalisation_claim(held, vs_untuned, vs_scratch)
    claim4 = transfer_cost_claim(
        costs["pretrained, tuned"], costs["scratch, tuned"], saved, price_per_hour, currency
    )
    doc.add(claim1, claim2, claim3, claim4)

    # sections with numbers and plots
    doc.add(Heading("1. Better answers"))
    perf = plots.three_way(folder, ways, "transfer_performance.png", names)
    doc.add(Image(perf, "each way per suite") if perf else None)
    rows = [[s, *(_score_cell(w) for w in ways[s])] for s in suites]
    doc.add(Table(["suite", *names], rows))
    doc.add(Heading("2. Training time: validation loss from each start"))
    curves = plots.transfer_curves(folder, pre_curve, scratch_curve)
    doc.add(Image(curves, "validation loss against tokens for both starts") if curves else None)
    doc.add(
        Table(
            ["step", "tokens", "pretrained start", "scratch start"]
            + (["recipe as shipped"] if shipped else []),
            _curve_rows(pre_curve, scratch_curve, shipped_curve if shipped else None),
        )
    )
    doc.add(Heading("3. Generalisation: seen vs held-out clusters"))
    if held:
        gen = plots.three_way_seen(folder, {s: ways[s] for s in held}, names)
        doc.add(Image(gen, "seen and unseen clusters, each way") if gen else None)
        rows = []
        for s in held:
            for side in ("seen", "unseen"):
                rows.append([f"{s}, {side} clusters", *(_score_cell(w, side) for w in ways[s])])
        doc.add(Table(["", *names], rows))
    else:
        doc.add(Para("No cluster was held out; set eval.holdout_clusters in the recipe."))
    doc.add(*_forgetting(pre_dir, pre_dir, "pretrained-tuned"))
    if shipped:
        doc.add(*_forgetting(pre_dir, shipped_dir, "pretrained-tuned as shipped"))
    doc.add(Heading("4. Cost"))
    cost_png = plots.cost_bars(folder, costs)
    doc.add(Image(cost_png, "training time and estimated FLOPs per start"))
    doc.add(
        Para(
            f"Device time priced at {price_per_hour:g} {currency} per device-hour "
            "(report.price_per_hour); training time only, the part in which the runs differ. "
            "Per million tokens: the cost divided by the tokens each run trained on."
        )
    )
    doc.add(
        Table(
            [
                "",
                "training s",
                "steps",
                "tokens",
                "est. FLOPs",
                f"cost, {currency}",
                f"{currency} per 1M tokens",
                "peak MiB",
            ],
            [
                [
                    k,
                    f"{v['train_s']:.0f}",
                    str(v["steps"]),
                    f"{v['tokens']:,}",
                    f"{v['flops']:.3g}",
                    f"{v['cost']:.4f}",
                    "—" if v["cost_per_mtok"] is None else f"{v['cost_per_mtok']:.4f}",
                    f"{v['peak_mb']:.0f}",
                ]
                for k, v in costs.items()
            ],
        )  # fmt: skip
    )
    reports = ["pretrained/report.html", "scratch/report.html"]
    reports += ["shipped/report.html"] if shipped else []
    doc.add(Para("Per-run reports: " + ", ".join(reports) + "."))
    return doc


def _curve_rows(pre, scratch, shipped=None) -> list[list[str]]:
    """Validation loss by the pretrained run's steps; the recipe as shipped's column (its own
    tokens differ: it trains replay rows too) when given."""
    others = [{p[0]: p for p in c} for c in (scratch, shipped) if c is not None]
    rows = []
    for p in pre:
        cells = [f"{o[p[0]][3]:.3f}" if p[0] in o else "—" for o in others]
        rows.append([str(p[0]), f"{p[1]:,}", f"{p[3]:.3f}", *cells])
    return rows


def write_transfer_report(
    folder: Path, price_per_hour: float = 0.10, currency: str = "USD"
) -> Path:
    """report.md, report.html and the plots in the experiment's folder; a full or read-only
    disk is one error naming the folder."""
    with writing(folder, "transfer report"):
        md, page = write(build_transfer_report(folder, price_per_hour, currency), folder)
    return page
