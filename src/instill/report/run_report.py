"""report.md and report.html for one run directory, from its files only (run.json,
metrics.jsonl, eval/): performance, generalisation, forgetting, time and cost, curves, data.
Every claim is stated with its number and whether the number supports it."""

from __future__ import annotations

import json
from pathlib import Path

from instill.atomic import writing
from instill.config import ReportConfig
from instill.eval.compare import Side, compare_suite
from instill.eval.drift import NO_DROP, limit_cells
from instill.eval.results import (
    EVALUATIONS,
    RUN_RESULTS,
    all_summaries,
    read_records,
    read_summary,
)
from instill.report import plots
from instill.report.claims import (
    GENERAL,
    device_cost,
    forgetting_verdict,
    generalisation_verdict,
    interval,
    is_guard,
    pct,
    performance_verdict,
    signed,
    training_flops,
)
from instill.report.deployed import deployed_blocks
from instill.report.document import Document, Heading, Image, Para, Table, write
from instill.report.preference import preference_block
from instill.report.summary import (
    DRIFT_TERMS,
    REPORT_PHASE,
    data_flow,
    data_notes,
    phase_rows,
    read_recipe,
    recipe_rows,
)
from instill.rundir import RunDir


def load_run(run_dir: Path) -> dict:
    path = RunDir(run_dir).record_file
    if not path.is_file():
        from instill.errors import InstillError

        raise InstillError(
            f"{run_dir}: no run.json; report needs a finished run directory (instill train)"
        )
    return json.loads(path.read_text())


def suite_tables(run_dir: Path) -> list[dict]:
    """compare_suite tables (base vs tuned) for every suite evaluated both ways."""
    folder = RunDir(run_dir).results
    if not folder.is_dir():
        return []
    base, tuned = Side("base", folder, "base-"), Side("tuned", folder)
    common = [s for s in base.suites() if s in set(tuned.suites())]
    return [compare_suite(base, tuned, s) for s in common]


SUITE_STAR = (
    "A * marks a change in points whose 95% interval (paired bootstrap over the same examples) "
    "excludes 0."
)
DRIFT_STAR = (
    "A * marks a change whose 95% interval excludes no change (0, or x1.00 for reply length): "
    "a real change, which is a loss only past its limit."
)


def table_block(t: dict, first: str = "", limit: str = "") -> Table:
    """A suite, base vs tuned, per cluster; `limit` (a guard's line) fills a column on the
    overall row, the one a verdict weighs."""
    rows = []
    for r in t["rows"]:
        label = r.label.strip() if r.label.startswith(" ") else f"**{r.label}**"
        sig = " *" if r.significant else ""
        cells = [label, pct(r.a), pct(r.b), signed(r.delta) + sig, interval(r.ci), str(r.n_b)]
        rows.append(cells + ([limit if r.label == "overall" else ""] if limit else []))
    header = [first or "cluster", "base", "tuned", "delta", "delta 95% CI", "n"]
    return Table(header + (["limit"] if limit else []), rows)


def starred(table: Table | None, note: str) -> list:
    """A table, then the note on its * marks right below it when any cell carries one."""
    if table is None:
        return []
    marked = any(c.endswith(" *") for r in table.rows for c in r)
    return [table, Para(note)] if marked else [table]


def drift_block(t: dict) -> Table:
    """A drift suite, base vs tuned: drift per kind, reply length, short replies, ROUGE-L."""
    gen = t["generation"]
    header = ["measure (kind)", "base", "tuned", "change", "95% CI", "limit"]
    rows: list[list[str]] = []
    if not gen["n"]:
        return Table(header, rows)
    limit = limit_cells()
    for r in t["rows"]:
        kind = r.label.startswith(" ")  # the verdict weighs the overall drift, not each kind's
        label = r.label.strip() if kind else "**drift, nats/token**"
        sig = " *" if r.significant else ""
        ci = "—" if r.ci is None else f"{r.ci[0]:+.3f} to {r.ci[1]:+.3f}"
        rows.append([label, f"{r.a:.3f}", f"{r.b:.3f}", f"{r.delta:+.3f}{sig}", ci,
                     "" if kind else limit["drift"]])  # fmt: skip
    ta, tb, ratio, ci = gen["tokens"]
    sig = " *" if ci[0] > 1 or ci[1] < 1 else ""
    rows.append(["**reply tokens (mean)**", f"{ta:.1f}", f"{tb:.1f}", f"x{ratio:.2f}{sig}",
                 f"x{ci[0]:.2f} to x{ci[1]:.2f}", limit["tokens"]])  # fmt: skip
    sa, sb, delta, sci = gen["short"]
    sig = " *" if sci[0] > 0 or sci[1] < 0 else ""
    rows.append(["**replies under 10 words (%)**", pct(sa), pct(sb), signed(delta) + sig,
                 interval(sci), limit["short"]])  # fmt: skip
    r = gen["rouge_l"]
    if r is not None:
        sig = " *" if r.significant else ""
        rows.append(["**ROUGE-L vs references (%)**", pct(r.a), pct(r.b), signed(r.delta) + sig,
                     interval(r.ci), limit["rouge_l"]])  # fmt: skip
    return Table(header, rows)


def moved_block(t: dict, a: str = "base", b: str = "tuned") -> Table | None:
    """The prompts whose drift grew most, with both replies side by side."""
    moved = t["generation"]["moved"]
    if not moved:
        return None
    rows = [
        [_short(m["prompt"], 120), _short(m["a"], 200), _short(m["b"], 200),
         f"{m['drift_change']:+.2f}"]
        for m in moved
    ]  # fmt: skip
    return Table(["prompt", f"{a} reply", f"{b} reply", "drift change"], rows, "lllr")


def _records(run_dir: Path, stem: str) -> dict[str, dict]:
    return {r["id"]: r for r in read_records(RunDir(run_dir).results, stem) or [] if "id" in r}


def _short(text, n: int = 160) -> str:
    text = text if isinstance(text, str) else " | ".join(text)
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _spread(ids: list[str], records: dict[str, dict]) -> list[str]:
    """Round-robin over clusters (then families), so the examples shown are not all one kind."""
    groups: dict[str, list[str]] = {}
    for i in ids:
        r = records[i]
        groups.setdefault(r.get("cluster") or r.get("family") or "", []).append(i)
    out: list[str] = []
    for k in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[k] for g in groups.values() if k < len(g)]
    return out


def examples_block(run_dir: Path, suite: str, k: int = 4) -> Table | None:
    """A few prompts with both answers side by side: gains first, then losses."""
    base, tuned = _records(run_dir, f"base-{suite}"), _records(run_dir, suite)
    both = [i for i in tuned if i in base]
    both = _spread(both, tuned)
    gains = [i for i in both if tuned[i]["score"] > base[i]["score"]]
    losses = [i for i in both if tuned[i]["score"] < base[i]["score"]]
    same = [i for i in both if tuned[i]["score"] == base[i]["score"]]
    pick = gains[: k - 1] + losses[:1]
    pick += same[: k - len(pick)]
    if not pick:
        return None
    rows = [
        [
            _short(tuned[i]["prompt"]),
            _short(tuned[i]["reference"], 60),
            _short(base[i]["prediction"], 80) + f" ({pct(base[i]['score'])})",
            _short(tuned[i]["prediction"], 80) + f" ({pct(tuned[i]['score'])})",
        ]
        for i in pick
    ]
    return Table(
        ["prompt", "reference", "base answer (score)", "tuned answer (score)"], rows, "llll"
    )


def suite_summary(run_dir: Path, stem: str) -> dict | None:
    """A run's eval/<stem>.json summary, or None when that suite was not evaluated."""
    return read_summary(RunDir(run_dir).results, stem)


def constraints_block(run_dir: Path, suite: str) -> Table | None:
    """Verifiable constraints obeyed one by one (IFEval's instruction level), base vs tuned."""
    base = (suite_summary(run_dir, f"base-{suite}") or {}).get("constraints")
    tuned = (suite_summary(run_dir, suite) or {}).get("constraints")
    if not base or not tuned:
        return None
    rows = [
        [
            "**every constraint**",
            pct(base["instruction_level"]["score"]),
            pct(tuned["instruction_level"]["score"]),
            str(tuned["instruction_level"]["n"]),
        ]
    ]
    for kind, stat in tuned["by_kind"].items():
        before = base["by_kind"].get(kind, {}).get("score")
        rows.append([kind, pct(before), pct(stat["score"]), str(stat["n"])])
    return Table(["constraint obeyed (%)", "base", "tuned", "n"], rows)


def forgetting_blocks(tables: list[dict], a: str = "base", b: str = "tuned") -> list:
    """The guards' tables, and the replies that moved most for each drift suite."""
    blocks: list = []
    general = next((t for t in tables if t["suite"] == GENERAL), None)
    if general is not None:
        blocks += [
            Heading("General knowledge (choice accuracy, %)", 3),
            *starred(table_block(general, limit=NO_DROP), SUITE_STAR),
        ]
    else:
        blocks.append(Para("The general suite (choice) was not evaluated."))
    drift = [t for t in tables if t["metric"] == "drift"]
    for t in drift:
        blocks += [
            Heading(f"General behaviour: {t['suite']} (replies against the base model's)", 3),
            Para(
                "Drift is the per-token NLL (negative log-likelihood, in nats) of the base "
                "model's own greedy replies under the model, minus under the base: an estimate "
                "of KL(base || model) on general requests; 0 is no change, negative is the "
                "tuned model finding those replies more likely than the base did."
            ),
            *starred(drift_block(t), DRIFT_STAR),
            Para("The replies whose drift grew most:") if t["generation"]["moved"] else None,
            moved_block(t, a, b),
        ]
    if not drift:
        blocks.append(Para("General behaviour by generation (general_gen) was not evaluated."))
    return [x for x in blocks if x is not None]


def _autocast(autocast: str | None) -> str:
    """Whether training's forward and backward ran under autocast (train.autocast, or weights
    that train in half precision), the trained weights and optimiser state staying float32."""
    return f"{autocast} (trained weights kept in float32)" if autocast else "off"


def _units(run: dict) -> str:
    """What the loop counted as the loss's units: supervised tokens, or (a preference run)
    pairs or kto's rows, each replay row one more."""
    n = run["train"]["trained_tokens"]
    name = (run.get("objective") or {}).get("name", "sft")
    if name == "sft":
        return f"{n:,} supervised"
    what = "labelled rows" if name == "kto" else "pairs"
    replay = (run.get("data") or {}).get("replay_rows")
    return f"{n:,} {what}" + (", a replay row counted as one" if replay else "")


def cost_lines(run: dict, price_per_hour: float, currency: str) -> tuple[list[list[str]], float]:
    tr, params = run["train"], run["params"]
    flops = training_flops(params["total"], params["trainable"], tr["tokens"])
    cost = device_cost(run["wall_s"], price_per_hour)
    rows = [
        ["training", f"{tr['wall_s']:.0f} s, {tr['steps']} steps"],
        ["tokens trained on", f"{tr['tokens']:,} ({_units(run)})"],
        ["throughput", f"{tr['tokens_per_s']:.0f} tokens/s"],
        ["autocast", _autocast(tr.get("autocast"))],
        ["estimated training FLOPs", f"{flops:.3g}"],
        ["peak memory", f"{tr['peak_mem_mb']:.0f} MiB"],
        [
            "trainable parameters",
            f"{params['trainable']:,} of {params['total']:,} "
            f"({100 * params['trainable'] / params['total']:.2f}%)",
        ],
        [f"cost at {price_per_hour:g} {currency} per device-hour", f"{cost:.4f} {currency}"],
    ]
    return rows, cost


def time_blocks(run: dict) -> list:
    """Where the wall time went, phase by phase (run.json's phases), or the evaluation total of
    a run recorded before phases were kept."""
    phases = run.get("phases")
    if phases:
        note = (
            ""
            if REPORT_PHASE in phases
            else " The report's own writing is timed after this page was written: run.json "
            "and the end-of-run print include it."
        )
        return [
            Table(["phase", "seconds", "share"], phase_rows(phases, run["wall_s"]), "lrr"),
            Para(
                "Each phase is timed where the run performs it (recipe.py); what lies between "
                f"them (imports, process setup, checks) is the time not accounted for.{note}"
            ),
        ]
    eval_s = sum(
        s.get("wall_s", 0) for k in ("eval_before", "eval_after") for s in run.get(k, {}).values()
    )
    rows = [
        ["wall time, whole run", f"{run['wall_s']:.0f} s"],
        ["evaluation (base and tuned)", f"{eval_s:.0f} s"],
    ]
    return [
        Table(["measure", "value"], rows, "lr"),
        Para("This run was recorded before instill kept a phase breakdown in run.json."),
    ]


def objective_para(run: dict) -> Para | None:
    """What the run optimised and against which reference (preference runs), and the run it
    started from (a second stage): both stages named, so the report's "before" is clear."""
    o = run.get("objective") or {}
    parts = []
    if o.get("started_from"):
        f = o["started_from"]
        parts.append(
            f"This is a second stage: it started from run **{f['run']}** ({f['its_objective']} "
            f'on {f["its_model"]}); "before" below is that run\'s tuned model.'
        )
    if o.get("name", "sft") != "sft":
        p = o.get("preference") or {}
        knobs = f"beta {p.get('beta')}"
        if o["name"] == "dpo":
            knobs += f", loss {p.get('loss_type')}"
        if p.get("sft_weight"):
            knobs += f", supervised term {p['sft_weight']}"
        parts.append(f"Objective **{o['name']}** ({knobs}); reference: {o.get('reference')}.")
    return Para(" ".join(parts)) if parts else None


def recipe_blocks(run_dir: Path, run: dict, recipe, why: str) -> list:
    """The recipe that made the run, at the top: what a user would change to get another."""
    if recipe is None:
        return [Heading("Recipe"), Para(f"No recipe summary: {why}.")]
    return [Heading("Recipe"), Table(["setting", "value"], recipe_rows(recipe, run), "ll")]


def performance_blocks(run_dir: Path, tables: list[dict]) -> list:
    """The task suites, base vs tuned (the forgetting guards have their own section)."""
    blocks: list = [Heading("Performance")]
    perf = plots.performance(run_dir, tables)
    if perf:
        blocks.append(Image(perf, "base vs tuned per suite and cluster, with 95% intervals"))
    tasks = [t for t in tables if not is_guard(t)]
    for t in tasks:
        blocks += [
            Heading(f"Suite {t['suite']} ({t['metric']}, %)", 3),
            *starred(table_block(t), SUITE_STAR),
            constraints_block(run_dir, t["suite"]),
            examples_block(run_dir, t["suite"]),
        ]
    if not tasks:
        blocks.append(Para("No task suite was evaluated both before and after tuning."))
    return blocks


def loss_para(run: dict) -> Para | None:
    tr = run["train"]
    if tr.get("first_loss") is None:
        return None
    text = f"Loss {tr['first_loss']:.4f} (first step) → {tr['final_loss']:.4f} (last step)"
    if tr.get("final_val_loss") is not None:
        text += f"; validation {tr['final_val_loss']:.4f}"
    if run.get("base_val_loss") is not None:
        text += f"; base model's validation loss {run['base_val_loss']:.4f}"
    return Para(text + ".")


def build_run_report(run_dir: Path, price_per_hour: float = 0.10) -> Document:
    run = load_run(run_dir)
    recipe, why = read_recipe(run_dir)
    currency = recipe.report.currency if recipe is not None else ReportConfig().currency
    tables = suite_tables(run_dir)
    holdout = set(run.get("holdout_clusters") or [])
    for summary in all_summaries(RunDir(run_dir).results).values():
        holdout.update(summary.get("holdout_clusters") or [])
    doc = Document(f"instill run {run['name']}: what tuning bought")
    m = run["model"]
    doc.add(
        Para(
            f"Base model **{m['name']}** ({m['kind']}, sha256 {(m.get('sha256') or 'n/a')[:16]}), "
            f"tuned on {m['device']} in {m['dtype']}; held-out clusters: "
            f"{', '.join(sorted(holdout)) or 'none'}. Base and tuned results read from "
            f"`{run_dir / RUN_RESULTS}/` (the run's own evaluation; later ones, in "
            f"`{EVALUATIONS}/`, are compared with instill compare RUN --eval NAME)."
        ),
        *recipe_blocks(run_dir, run, recipe, why),
        objective_para(run),
        Heading("Claims and what the numbers say"),
        performance_verdict(tables),
        generalisation_verdict(tables),
        forgetting_verdict(tables),
    )
    if any(t["metric"] == "drift" for t in tables):
        doc.add(Para(DRIFT_TERMS))  # right below the first use of drift
    cost_table, cost = cost_lines(run, price_per_hour, currency)
    doc.add(
        Para(
            f"**Time and cost:** {run['train']['wall_s']:.0f} s of training "
            f"({run['wall_s']:.0f} s in all), cost {cost:.4f} {currency} at {price_per_hour:g} "
            f"{currency} per device-hour. What the pretrained start saved against training "
            "from scratch is measured by instill experiment transfer."
        )
    )
    doc.add(*performance_blocks(run_dir, tables))
    doc.add(*preference_block(run_dir))  # nothing unless the run measured held-out pairs
    doc.add(Heading("Generalisation: seen vs held-out clusters"))
    gen = plots.generalisation(run_dir, tables)
    doc.add(
        Image(gen, "seen vs unseen clusters before and after")
        if gen
        else Para("No cluster was held out (eval.holdout_clusters).")
    )
    doc.add(Heading("Forgetting: general knowledge and general behaviour"))
    doc.add(*forgetting_blocks(tables))
    doc.add(*deployed_blocks(run_dir))
    doc.add(
        Heading("Time and cost"), *time_blocks(run), Table(["measure", "value"], cost_table, "lr")
    )
    doc.add(Heading("Training curves"))
    curve = plots.training_curves(run_dir)
    doc.add(Image(curve, "loss against step and tokens, and the learning rate") if curve else None)
    doc.add(loss_para(run))
    d = run["data"]
    doc.add(
        Heading("Data"),
        Table(["rows", "count"], data_flow(d), "lr"),
        Para(
            "Read top to bottom: each + or - row moves the count, each = row is the count so far."
        ),
        Table(["measure", "value"], data_notes(d, run.get("packing_efficiency")), "lr"),
    )
    return doc


def write_run_report(run_dir: Path, price_per_hour: float = 0.10) -> tuple[Path, Path]:
    """report.md, report.html and the plots, in the run directory; a full or read-only disk is
    one error naming the run directory."""
    with writing(run_dir, "report"):
        return write(build_run_report(run_dir, price_per_hour), run_dir)
