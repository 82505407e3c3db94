"""The claims both reports make, each a Verdict: a statement, whether the numbers support it,
and the numbers. The run report (report/run_report.py: base vs tuned) and the transfer report
(report/experiment_report.py: pretrained vs scratch vs untuned) state their claims through
here, with one definition of cost and one rule for a gain: every delta positive with a 95%
interval that excludes 0."""

from __future__ import annotations

from instill.eval.drift import (
    NO_DROP,
    generation_changes,
    generation_losses,
    generation_text,
    longer_unseen,
)
from instill.report.document import Verdict

GENERAL = "general"  # the forgetting guard scored by choice
GAIN_RULE = "a gain counts when its 95% interval lies above 0"


def is_guard(t: dict) -> bool:
    """A forgetting guard: the general suite, or a suite scored by drift from the base."""
    return t["suite"] == GENERAL or t["metric"] == "drift"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def signed(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"


def interval(ci) -> str:
    return "—" if ci is None else f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}"


def training_flops(params_total: int, params_trainable: int, tokens: int) -> float:
    """Estimated training FLOPs: forward 2N per token, backward 2N for the activation gradients
    plus 2 per trainable parameter for the weight gradients (a frozen base needs no weight
    gradients, which is most of what an adapter saves)."""
    return tokens * (4 * params_total + 2 * params_trainable)


def device_cost(seconds: float, price_per_hour: float) -> float:
    """The one definition of cost: device time, in hours, times the price of a device-hour (in
    report.currency). The run report prices a whole run (its wall time, evaluation included); the
    transfer report prices each start's training, the part in which the two starts differ."""
    return seconds / 3600 * price_per_hour


def row(t: dict, label: str):
    return next((r for r in t["rows"] if r.label.strip() == label), None)


def change(r, limit: str = "") -> str:
    """A row's change in words; `limit`, when given, is the line it is held to."""
    held = f"; limit: {limit}" if limit else ""
    return (
        f"{pct(r.a)}% → {pct(r.b)}% ({signed(r.delta)} points, 95% CI {interval(r.ci)}, "
        f"n={r.n_b}{held})"
    )


def gain_verdict(
    claim: str, items: list[tuple[str, object]], unsupported: str = "", rule: bool = False
) -> Verdict:
    """The one rule for a gain: supported when every (text, row) delta is positive with an
    interval that excludes 0. The texts are joined; `unsupported` follows when it is not, and
    the rule itself when `rule` (the run report says each verdict's line). A delta whose whole
    interval lies below 0 is said to be a loss, whatever `unsupported` says of the others."""
    ok = all(r.significant and r.delta > 0 for _, r in items)
    text = "; ".join(t for t, _ in items) + "."
    if any(r.significant and r.delta < 0 for _, r in items):
        text += " A loss, not a gain: a 95% interval above lies wholly below 0."
    elif unsupported and not ok:
        text += f" {unsupported}"
    return Verdict(claim, ok, text + (f" Rule: {GAIN_RULE}." if rule else ""))


def performance_verdict(tables: list[dict]) -> Verdict:
    claim = "Better answers to prompts"
    tuned = [t for t in tables if not is_guard(t)]
    if not tuned:
        return Verdict(claim, None, "no task suite was evaluated before and after")
    return gain_verdict(
        claim,
        [(f"{t['suite']} {change(row(t, 'overall'))}", row(t, "overall")) for t in tuned],
        "A delta whose interval includes 0 (or is negative) does not show an improvement.",
        rule=True,
    )


def generalisation_verdict(tables: list[dict]) -> Verdict:
    claim = "Generalisation to unseen task kinds"
    held = [t for t in tables if row(t, "unseen clusters") is not None]
    if not held:
        return Verdict(
            claim, None,
            "no task cluster was held out of training; set eval.holdout_clusters to measure it",
        )  # fmt: skip
    items = [
        (
            f"{t['suite']}: seen clusters {signed(row(t, 'seen clusters').delta)} points, "
            f"unseen (held-out) clusters {change(row(t, 'unseen clusters'))}",
            row(t, "unseen clusters"),
        )
        for t in held
    ]
    return gain_verdict(
        claim,
        items,
        "The gain on held-out clusters is not distinguishable from zero.",
        rule=True,
    )


def _guard_readings(general: dict | None, drift: list[dict]) -> dict[str, list[str]]:
    """Each guard read against its line: losses (past it), measured (every value beside its
    limit), changed (a real change inside the limit), reaches (an interval across the limit),
    unmeasured, and blind (a limit the data cannot reach)."""
    out: dict[str, list[str]] = {
        k: [] for k in ("losses", "measured", "changed", "reaches", "unmeasured", "blind")
    }
    if general is not None:
        r = row(general, "overall")
        if r.delta is None:  # one side has no records of it: nothing to weigh
            out["unmeasured"].append(f"{GENERAL} (no records on both sides)")
        else:
            out["measured"].append(f"general knowledge (choice) {change(r, NO_DROP)}")
            if r.significant and r.delta < 0:
                out["losses"].append(f"general knowledge (choice) {signed(r.delta)} points")
    for t in drift:
        gen, name = t["generation"], t["suite"]
        if not gen["n"]:
            out["unmeasured"].append(f"{name} (no prompt answered on both sides)")
            continue
        out["measured"].append(f"{name}: {generation_text(gen)}")
        out["losses"] += [f"{name}: {x}" for x in generation_losses(gen)]
        for text, reaches in generation_changes(gen):
            out["reaches" if reaches else "changed"].append(f"{name}: {text}")
        if (why := longer_unseen(gen)) is not None:
            out["blind"].append(f"{name}: {why}")
    return out


def forgetting_verdict(tables: list[dict], b: str = "tuned") -> Verdict:
    """Three ways, each guard against its line: general knowledge by choice accuracy (a drop
    whose interval excludes 0), and general behaviour by generation (drift, reply length both
    ways, short replies, ROUGE-L; eval/drift.py holds the lines). Not supported (forgetting
    found) when some guard's whole 95% interval is past its line; not settled when none is but
    some interval reaches across its line (the numbers allow both, whichever side the point
    estimate is on); supported only when every interval stays inside. Every value is given
    beside its limit; a real change inside a limit and a length cap that leaves no room for
    longer replies are said, never called "no change"."""
    general = next((t for t in tables if t["suite"] == GENERAL), None)
    drift = [t for t in tables if t["metric"] == "drift"]
    if general is None and not drift:
        return Verdict(
            "No forgetting",
            None,
            "no forgetting guard was evaluated (add general and general_gen to eval.suites)",
        )
    g = _guard_readings(general, drift)
    if not g["measured"]:  # guards were evaluated, but none has data on both sides to compare
        return Verdict(
            "No forgetting",
            None,
            "No forgetting guard has results on both sides to pair: "
            + "; ".join(g["unmeasured"]) + ".",
        )  # fmt: skip
    measured = " Measured: " + "; ".join(g["measured"]) + "."
    blind = "".join(f" {x}." for x in g["blind"])
    if g["losses"]:
        gains = [row(t, "overall").delta for t in tables if not is_guard(t)]
        text = f"Forgetting found in the {b} model: " + "; ".join(g["losses"]) + "."
        if gains and general is not None:
            r = row(general, "overall")
            if r.significant and r.delta < 0 and -r.delta > max(x or 0 for x in gains):
                text += " The loss on general knowledge is larger than the gain on the tuned tasks."
        text += measured + blind
        if drift:
            text += " The replies that moved most are listed with the general_gen results."
        return Verdict("No forgetting", False, text)
    changed = (
        " Within its limit but a real change (its 95% interval excludes no change): "
        + "; ".join(g["changed"]) + "."
    ) if g["changed"] else ""  # fmt: skip
    rest = measured + "".join(f" Not measured: {x}." for x in g["unmeasured"]) + blind
    if g["reaches"]:
        text = (
            f"Not settled for the {b} model: no guard is past its limit by its whole 95% "
            "interval, but these intervals reach across a limit, so the numbers allow forgetting "
            "as well as none: " + "; ".join(g["reaches"]) + ". More prompts narrow them "
            "(eval.general_gen_per_kind, or a larger suite file)." + changed + rest
        )
        if drift:
            text += " The replies that moved most are listed with the general_gen results."
        return Verdict("No forgetting", None, text, settled=False)
    text = (
        "No guard is past its limit, and no guard's 95% interval reaches across one."
        + changed
        + rest
    )
    if not drift:
        text += " (general behaviour by generation was not measured: add general_gen)"
    return Verdict("No forgetting", True, text)


# --- the transfer experiment: pretrained + tuned against scratch + tuned and pretrained untuned


def transfer_answers_claim(suites: list[str], vs_untuned: dict, vs_scratch: dict) -> Verdict:
    """1. Tuning a pretrained model answers prompts better: over the untuned model, on every
    task suite (the scratch-tuned score alongside)."""
    claim = "1. Tuning a pretrained model answers prompts better"
    if not suites:
        return Verdict(claim, None, "no task suite evaluated")
    items = []
    for s in suites:
        u, sc = vs_untuned[s]["rows"][0], vs_scratch[s]["rows"][0]
        items.append(
            (
                f"{s}: untuned {pct(u.a)}%, scratch-tuned {pct(sc.a)}%, pretrained-tuned "
                f"{pct(u.b)}% ({signed(u.delta)} points over untuned, CI {interval(u.ci)}; "
                f"{signed(sc.delta)} over scratch, CI {interval(sc.ci)})",
                u,
            )
        )
    return gain_verdict(claim, items, "")


def transfer_training_claim(saved: dict | None) -> Verdict:
    """2. It takes less training than starting from scratch: the pretrained start reaches the
    scratch model's best validation loss in fewer steps (experiment_report.steps_saved)."""
    claim = "2. It takes less training than starting from scratch"
    if saved is None:
        return Verdict(claim, None, "no validation curves were logged")
    b, r = saved["scratch_best"], saved["pretrained_reached"]
    if r is None:
        return Verdict(
            claim,
            False,
            f"the scratch model's best validation loss ({b[3]:.3f} at step {b[0]}) was never "
            "reached by the pretrained start within the budget",
        )
    return Verdict(
        claim,
        saved["steps_saved"] > 0,
        f"the scratch model's best validation loss was {b[3]:.3f}, at step {b[0]} after "
        f"{b[1]:,} tokens; the pretrained start was already at {r[3]:.3f} at step {r[0]} "
        f"({r[1]:,} tokens): **{saved['steps_saved']} steps, {saved['tokens_saved']:,} tokens "
        f"and {saved['seconds_saved']:.0f} s of training saved**"
        + (" (before any tuning: the pretrained weights alone beat it)" if r[0] == 0 else ""),
    )


def transfer_generalisation_claim(held: list[str], vs_untuned: dict, vs_scratch: dict) -> Verdict:
    """3. It generalises to unseen task kinds: over the untuned model on held-out clusters."""
    claim = "3. It generalises to unseen task kinds"
    if not held:
        return Verdict(claim, None, "no task cluster was held out (eval.holdout_clusters)")
    items = []
    for s in held:
        u = row(vs_untuned[s], "unseen clusters")
        sc = row(vs_scratch[s], "unseen clusters")
        items.append(
            (
                f"{s}, held-out clusters: untuned {pct(u.a)}%, scratch-tuned {pct(sc.a)}%, "
                f"pretrained-tuned {pct(u.b)}% ({signed(u.delta)} over untuned, CI "
                f"{interval(u.ci)}, n={u.n_b})",
                u,
            )
        )
    return gain_verdict(
        claim, items, "The gain on held-out clusters is not distinguishable from zero."
    )


def training_costs(run: dict, price_per_hour: float) -> dict:
    """One start's training: seconds, steps, tokens, estimated FLOPs, cost (device_cost of the
    training time, in report.currency) in all and per million training tokens, and peak memory, from
    its run.json."""
    tr, p = run["train"], run["params"]
    cost = device_cost(tr["wall_s"], price_per_hour)
    return {
        "train_s": tr["wall_s"],
        "steps": tr["steps"],
        "tokens": tr["tokens"],
        "flops": training_flops(p["total"], p["trainable"], tr["tokens"]),
        "cost": cost,
        "cost_per_mtok": cost / tr["tokens"] * 1e6 if tr["tokens"] else None,
        "peak_mb": tr["peak_mem_mb"],
    }


def _work(c: dict) -> str:
    return f"{c['steps']} steps, {c['tokens']:,} training tokens"


def transfer_cost_claim(
    pre: dict, scratch: dict, saved: dict | None, price_per_hour: float, currency: str = "USD"
) -> Verdict:
    """4. It costs less: fewer training FLOPs, or (when the pretrained start reached the scratch
    model's best validation loss) less training time to get there. `pre` and `scratch` are
    training_costs. Equal work (the same steps and training tokens) is compared in all; unequal
    work per million training tokens, and the text says which basis it used."""
    price = f"{price_per_hour:g} {currency} per device-hour"
    if (pre["steps"], pre["tokens"]) == (scratch["steps"], scratch["tokens"]):
        text = (
            f"equal work ({_work(pre)} each): training cost {pre['cost']:.4f} {currency} "
            f"(pretrained start, {pre['train_s']:.0f} s, {pre['flops']:.3g} FLOPs) vs "
            f"{scratch['cost']:.4f} {currency} (scratch, {scratch['train_s']:.0f} s, "
            f"{scratch['flops']:.3g} FLOPs) at {price}"
        )
        cheaper = pre["flops"] < scratch["flops"]
    else:
        text = (
            f"unequal work ({_work(pre)} vs {scratch['steps']} steps, {scratch['tokens']:,}), "
            f"so compared per million training tokens: {pre['cost_per_mtok']:.4f} {currency} "
            f"vs {scratch['cost_per_mtok']:.4f} {currency} at {price} (pretrained start "
            f"{pre['train_s']:.0f} s, {pre['flops'] / pre['tokens']:.3g} FLOPs a token; scratch "
            f"{scratch['train_s']:.0f} s, {scratch['flops'] / scratch['tokens']:.3g})"
        )
        cheaper = pre["flops"] / pre["tokens"] < scratch["flops"] / scratch["tokens"]
    if saved and saved["pretrained_reached"] is not None:
        reached, best = saved["pretrained_reached"][2], saved["scratch_best"][2]
        text += (
            "; reaching the scratch model's best validation loss cost "
            f"{device_cost(reached, price_per_hour):.4f} {currency} from the pretrained start "
            f"vs {device_cost(best, price_per_hour):.4f} {currency} from scratch"
        )
        cheaper = reached < best
    return Verdict("4. It costs less", cheaper, text + ".")
