"""The run report's block for held-out preference pairs (RUN/eval/preference.json, written by
eval/preference.py): before and after, the change with its interval clustered by prompt, the
same split by whether the chosen reply is the longer one, and a plain sentence when a gain in
preference accuracy came only where the chosen reply is longer (a preference for length, not
necessarily for quality)."""

from __future__ import annotations

from pathlib import Path

from instill.eval.preference import MEASURES, read_preference
from instill.report.claims import interval, pct, signed
from instill.report.document import Heading, Para, Table
from instill.rundir import RunDir

ACCURACIES = ("ln_accuracy", "reward_accuracy", "sum_accuracy")
SUBSETS = {"chosen_longer": "chosen reply longer", "chosen_not_longer": "chosen not longer"}


def _cells(key: str, m: dict) -> list[str]:
    """before, after, change, change 95% CI: accuracies in %, margins in nats."""
    start, model, delta = m.get("start"), m["model"], m.get("delta")
    if "margin" in key:
        num = lambda s, f="{:.3f}": "—" if s is None else f.format(s["value"])  # noqa: E731
        ci = "—" if delta is None else "{:+.3f} to {:+.3f}".format(*delta["ci95"])
        return [num(start), num(model), num(delta, "{:+.3f}"), ci]
    value = lambda s: None if s is None else s["value"]  # noqa: E731
    return [pct(value(start)), pct(value(model)), signed(value(delta)),
            interval(None if delta is None else delta["ci95"])]  # fmt: skip


def _gains(summary: dict) -> list[str]:
    """The accuracy measures whose change excludes 0 upwards."""
    return [k for k in ACCURACIES
            if (d := summary["measures"].get(k, {}).get("delta")) and d["ci95"][0] > 0]  # fmt: skip


def length_note(summary: dict) -> str:
    """Whether a gain in preference accuracy held where the chosen reply is not the longer one,
    or came only with longer chosen replies."""
    if not summary["measures"]["ln_accuracy"].get("delta"):
        return ""
    gains = _gains(summary)
    if not gains:
        return "No gain in preference accuracy whose 95% interval excludes 0."
    sub = summary["by_length"]
    notes = []
    for key in gains:
        longer = sub["chosen_longer"]["measures"].get(key, {}).get("delta")
        others = sub["chosen_not_longer"]["measures"].get(key, {}).get("delta")
        label, total = MEASURES[key], signed(summary["measures"][key]["delta"]["value"])
        if others is None or longer is None:
            continue
        n_l, n_o = sub["chosen_longer"]["n"], sub["chosen_not_longer"]["n"]
        where = (f"{signed(longer['value'])} points on the {n_l} pairs whose chosen reply is "
                 f"longer, {signed(others['value'])} ({interval(others['ci95'])}) on the {n_o} "
                 "others")  # fmt: skip
        if others["ci95"][0] <= 0 < longer["value"] - others["value"]:
            notes.append(
                f"**The gain in {label} ({total} points) came with longer chosen replies**: "
                f"{where}, so it may be a preference for length rather than for what the "
                "replies say."
            )
        else:
            notes.append(f"The gain in {label} ({total} points) holds where the chosen reply "
                         f"is not the longer one too: {where}.")  # fmt: skip
    return " ".join(notes)


def preference_block(run_dir: Path) -> list:
    """Report blocks for RUN/eval/preference.json; [] when the run measured no pairs."""
    got = read_preference(RunDir(run_dir).results)
    if got is None:
        return []
    s, _ = got
    header = ["measure", "before", "after", "change", "change 95% CI"]
    rows = [[f"**{MEASURES[k]}**" + ("" if "margin" in k else " (%)"), *_cells(k, m)]
            for k, m in s["measures"].items()]  # fmt: skip
    for name, label in SUBSETS.items():
        part = s["by_length"][name]
        for key in ACCURACIES:
            if key in part["measures"]:
                cells = _cells(key, part["measures"][key])
                rows.append([f"{MEASURES[key]} (%), {label} (n={part['n']})", *cells])
    ref = s.get("reference")
    lengths = s["lengths"]
    blocks = [
        Heading("Preference on held-out pairs"),
        Para(
            f"{s['n']} pairs on {s['prompts']} prompts from `{s['pairs']}`; after: "
            f"{s['model']}; before: {s.get('start') or 'not measured'}; implicit reward "
            + (f"against **{ref}**." if ref else "not measured (no reference).")
            + f" Chosen replies average {lengths['chosen_tokens']:.1f} tokens, rejected "
            f"{lengths['rejected_tokens']:.1f}; the chosen reply is the longer one in "
            f"{pct(lengths['chosen_longer']['value'])}% of pairs (the data's own length bias)."
        ),
        Table(header, rows),
        Para(s["note"] + "."),
    ]
    note = length_note(s)
    if note:
        blocks.append(Para(note))
    return blocks
