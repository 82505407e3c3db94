"""The run report's plain facts, each in one table a user can check by hand: the recipe that
made the run, where the data's rows went (a running sum from rows read to rows trained on), and
where the wall time went (one row per phase, the remainder shown). The CLI's end-of-run print
uses the same phase rows, so the two never disagree."""

from __future__ import annotations

from pathlib import Path

REPORT_PHASE = "report and model card"  # timed after the page is written (run.json has it)

# One line each, placed where the term is first used (issue 27: "drift, nats/token" unexplained)
DRIFT_TERMS = (
    "**Reading the guards.** Drift: how much less likely the tuned model finds the base model's "
    "own replies than the base model does, in nats per token (the natural-log unit of surprise: "
    "+0.69 nats per token means each token of those replies became half as likely); 0 is no "
    "change, and a negative value means the tuned model finds the base's replies more likely "
    "than the base itself did, which is no loss. Reply length is the tuned model's mean reply "
    "length over the base's (1.00x: unchanged). Each guard's limit is given beside its value; "
    "a guard is crossed only when its whole 95% interval lies past the limit."
)


def read_recipe(run_dir: Path):
    """The run's config.yaml through the typed schema, or None (with the reason) when it is
    missing or no longer valid."""
    from instill.rundir import RunDir

    return RunDir(run_dir).recipe_or_reason()


def _method(recipe) -> str:
    a, t = recipe.adapter, recipe.train
    if a.method == "full":
        text = "full fine-tuning" + (f", frozen: {', '.join(a.freeze)}" if a.freeze else "")
    else:
        targets = (
            a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules)
        )
        kind = "QLoRA (4-bit base)" if recipe.model.quantize == "4bit" else "LoRA"
        extra = "".join(x for x, on in ((", DoRA", a.use_dora), (", rsLoRA", a.use_rslora)) if on)
        text = f"{kind} r={a.r}, alpha {a.alpha:g}, {targets}{extra}"
    text += f"; objective {t.objective}"
    if t.kl_to_base:
        text += f", KL to the base {t.kl_to_base:g}"
    return text


def recipe_rows(recipe, run: dict) -> list[list[str]]:
    """The recipe in one table: base, method, learning rate, steps, replay, data, evaluation."""
    t, d, m = recipe.train, run["data"], run["model"]
    steps = run["train"]["steps"]
    planned = (
        f"of at most {t.max_steps}" if t.max_steps is not None else f"over {t.epochs:g} epochs"
    )
    replay = "none"
    if recipe.data.replay is not None:
        replay = (
            f"{recipe.data.replay.fraction:g} of the training rows are the base model's own "
            f"replies to general prompts ({d.get('replay_rows', 0):,} rows)"
        )
    sources = "; ".join(f"{k}: {v:,} rows" for k, v in (d.get("formats") or {}).items())
    held = ", ".join(recipe.eval.holdout_clusters) or "none"
    suites = [s if isinstance(s, str) else s.name for s in recipe.eval.suites]
    return [
        ["base model", f"{m['name']} ({m['kind']})"],
        ["method", _method(recipe)],
        ["learning rate", f"{t.lr:g} ({t.schedule}, warmup {100 * t.warmup_ratio:g}%)"],
        [
            "steps",
            f"{steps} {planned} (batch {t.batch_size} x {t.grad_accum} accumulation, "
            f"max_length {recipe.data.max_length})",
        ],
        ["replay", replay],
        ["data", sources or "none recorded"],
        ["evaluation", f"suites {', '.join(suites)}; held-out clusters {held}"],
        ["seed", str(t.seed)],
    ]


def _count(n: int, sign: str = "") -> str:
    return f"{sign}{n:,}"


def data_flow(d: dict) -> list[list[str]]:
    """Rows from read to trained on, as a running sum: a row starting with + or - moves the
    total, a row starting with = is the total so far. A run recorded before the read side was
    kept (no `read`) starts at the rows prepared for training."""
    rows: list[list[str]] = []
    if d.get("read") is not None:
        rows.append(["rows read from the training sources", _count(d["read"])])
        if d.get("held_out_read"):
            rows.append(
                ["- rows of held-out clusters (never trained on)", _count(d["held_out_read"], "-")]
            )
        if d.get("validation_split"):
            rows.append(["- rows taken for validation", _count(d["validation_split"], "-")])
        if d.get("weighted"):
            sign = "+" if d["weighted"] > 0 else "-"
            rows.append([f"{sign} rows {'repeated' if sign == '+' else 'left out'} by source "
                         "weights", _count(abs(d["weighted"]), sign)])  # fmt: skip
        rows.append(["= rows prepared for training", _count(d["rows_in"])])
    else:
        rows.append(["rows prepared for training (after the validation split and held-out "
                     "clusters)", _count(d["rows_in"])])  # fmt: skip
    own = {k: v for k, v in (d.get("dropped") or {}).items() if not k.startswith("replay: ")}
    for reason, n in own.items():
        rows.append([f"- dropped: {reason}", _count(n, "-")])
    if d.get("replay_rows"):
        rows.append(["+ replay rows (the base model's own replies, data.replay)",
                     _count(d["replay_rows"], "+")])  # fmt: skip
    rows.append(["= rows trained on", _count(d["rows"])])
    return rows


def data_notes(d: dict, packing: float | None) -> list[list[str]]:
    """What the running sum does not hold: validation, held-out, tokens, skipped rows."""
    replay_dropped = {
        k.removeprefix("replay: "): v for k, v in (d.get("dropped") or {}).items()
        if k.startswith("replay: ")
    }  # fmt: skip
    rows = [
        ["validation rows", f"{d.get('validation_rows', 0):,}"],
        [
            "rows of held-out clusters, all sources (never trained on)",
            "not recorded" if d.get("held_out") is None else f"{d['held_out']:,}",
        ],
        ["tokens", f"{d['tokens']:,} ({d['trained_tokens']:,} trained)"],
        ["truncated rows (cut at data.max_length)", f"{d['truncated']:,}"],
        [
            "bad rows skipped (skipped_rows.jsonl; never counted as read)",
            f"{d.get('skipped', 0):,}",
        ],
    ]
    if replay_dropped:
        rows.append(["replay replies dropped (reason: count)",
                     ", ".join(f"{k}: {v}" for k, v in replay_dropped.items())])  # fmt: skip
    if packing is not None:
        rows.append(["packing efficiency", f"{100 * packing:.1f}%"])
    for name, n in (d.get("formats") or {}).items():
        rows.append([f"source {name}", f"{n:,} rows read"])
    return rows


def phase_rows(phases: dict[str, float], wall_s: float) -> list[list[str]]:
    """One row per phase (seconds, share of the wall time), the time no phase holds, and the
    whole run: the rows add up to the wall time."""
    rows = [[name, f"{s:.1f}", f"{100 * s / wall_s:.1f}%" if wall_s else "—"]
            for name, s in phases.items()]  # fmt: skip
    rest = wall_s - sum(phases.values())
    rows.append(
        ["not accounted for", f"{rest:.1f}", f"{100 * rest / wall_s:.1f}%" if wall_s else "—"]
    )
    rows.append(["= whole run", f"{wall_s:.1f}", "100.0%"])
    return rows


def phase_lines(phases: dict[str, float], wall_s: float) -> list[str]:
    """phase_rows as aligned lines for the end-of-run print."""
    rows = phase_rows(phases, wall_s)
    width = max(len(r[0]) for r in rows)
    return [f"  {name:<{width}}  {s:>8} s  {share:>6}" for name, s, share in rows]
