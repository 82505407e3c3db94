"""Preference on held-out pairs: does a model give its higher likelihood to the chosen reply?

    pair_rows(tokenizer, path, max_length)   a pair file -> PairRows and their sha256
    score_pairs(model, pad_id, rows)         per pair: chosen/rejected summed log-prob, tokens
    preference_summary(model, reference, start)
        per pair: length-normalised preference (mean token log-prob, chosen > rejected),
        summed preference, and with a reference the implicit reward margin
        (model - reference log-ratio of chosen) - (the same of rejected); means with 95%
        intervals clustered by prompt, the paired change from `start` (before) to `model`
        (after), the data's own length bias, and everything again split by whether the
        chosen reply is the longer one (a gain only there may be length, not quality)
    write_preference / read_preference       <folder>/preference.json + preference.jsonl
    pair_preference(before, after)           two written results on the same rows, paired
    evaluate_pairs(model, pairs, reference)  `instill eval-pairs`: load, score, summarise
    run_start(run_dir)                       the model a run started from (its reference)

Accuracy counts a pair 1 only when the chosen side is strictly higher, so a tie counts 0 (as
TRL's rewards/accuracies): with the model equal to the reference every implicit margin is 0 and
the implicit-reward accuracy is 0, not 0.5. Margins are in nats (the implicit reward is not
multiplied by any beta). Intervals resample prompts, not pairs: pairs sharing a prompt (the
AlpacaEval file has 3 per prompt) are not independent, and a pair bootstrap would be too narrow.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from instill.atomic import write_text
from instill.config import ModelConfig
from instill.data.dataset import labels_from, pad_right
from instill.data.preference import Pair, read_preferences
from instill.data.preference_tokens import PairRow, rows_sha256, tokenize_preferences
from instill.errors import InstillError
from instill.eval.metrics import bootstrap_clustered_ci
from instill.eval.results import (
    PREFERENCE,
    RECORDS_SHA256,
    RUN_RESULTS,
    read_records,
    read_summary,
    records_sha256,
)
from instill.jsonl import write_jsonl
from instill.train.preference import model_logps

ACCURACY_NOTE = (
    "accuracy: the share of pairs whose chosen side is strictly higher (ties count 0, so a model "
    "scored against itself has implicit-reward accuracy 0); margins in nats; 95% intervals "
    "resample prompts. When the reference is the starting model, the implicit reward measures "
    "have no before side (the start's margins are 0 by definition): read them against chance, "
    "50% and a margin of 0; below 50% most pairs moved the wrong way"
)
# measure -> its label; per_pair computes them (the implicit reward ones need a reference)
MEASURES = {
    "ln_accuracy": "length-normalised accuracy",
    "ln_margin": "length-normalised margin (nats/token)",
    "sum_accuracy": "summed log-prob accuracy",
    "reward_accuracy": "implicit reward accuracy",
    "reward_margin": "implicit reward margin (nats)",
}
_KEYS = ("source", "prompt", "chosen_tokens", "rejected_tokens")


def pair_rows(tokenizer, path: str, max_length: int, setting: str = "--max-length"):
    """Every pair of a preference file, tokenised, and how many had a reply cut to fit."""
    items, fmt = read_preferences(path)
    if not items or not all(isinstance(i, Pair) for i in items):
        raise InstillError(
            f"{path}: held-out preference needs pairs (prompt, chosen, rejected); this file holds "
            f"{'no rows' if not items else f'{fmt} rows (labelled completions)'}"
        )
    rows, stats = tokenize_preferences(tokenizer, items, max_length, setting=setting)
    return rows, stats.truncated


def _prompt_key(row: PairRow) -> str:
    return hashlib.sha256(json.dumps(row.prompt_ids).encode()).hexdigest()[:16]


def score_pairs(model, pad_id: int, rows: list[PairRow], batch_size: int = 8) -> list[dict]:
    """Per pair, in the rows' order: chosen and rejected summed reply log-probs and reply
    token counts (one padded forward per batch holding its pairs' chosen and rejected rows;
    rows are batched by length so that little is padding). No gradients; the model's
    train/eval mode is restored afterwards."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -max(len(rows[i].chosen()[0]),
                                                        len(rows[i].rejected()[0])))  # fmt: skip
    out: list[dict | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [rows[i] for i in order[start : start + batch_size]]
                seqs = [r.chosen() for r in batch] + [r.rejected() for r in batch]
                ids, attn, mask = pad_right(seqs, pad_id)
                labels = labels_from(ids, mask)
                logps, counts = model_logps(
                    model, ids.to(device), labels.to(device), attn.to(device)
                )
                logps, counts, n = logps.double().cpu().tolist(), counts.cpu().tolist(), len(batch)
                for k, i in enumerate(order[start : start + batch_size]):
                    out[i] = {
                        "id": i,
                        "source": rows[i].source,
                        "prompt": _prompt_key(rows[i]),
                        "chosen_logp": logps[k],
                        "rejected_logp": logps[n + k],
                        "chosen_tokens": int(counts[k]),
                        "rejected_tokens": int(counts[n + k]),
                    }
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def _check_aligned(model: list[dict], other: list[dict] | None, name: str) -> None:
    """Refuse records of other pairs. Not by their source (file:line): the same pairs in a
    copy of the file under another name are the same pairs."""
    if other is None:
        return
    same = ("prompt", "chosen_tokens", "rejected_tokens")
    if len(other) != len(model) or any(
        tuple(a[k] for k in same) != tuple(b[k] for k in same)
        for a, b in zip(model, other, strict=True)
    ):
        raise InstillError(
            f"the {name} model's records are not of the same pairs as the model's (another file, "
            "max length or tokenizer); score both on the same tokenised pairs"
        )


def per_pair(rec: dict, ref: dict | None) -> dict[str, float]:
    """One pair's measures (see MEASURES); the implicit reward ones only with a reference."""
    c, r = rec["chosen_logp"], rec["rejected_logp"]
    ln = c / rec["chosen_tokens"] - r / rec["rejected_tokens"]
    values = {"ln_accuracy": float(ln > 0), "ln_margin": ln, "sum_accuracy": float(c > r)}
    if ref is not None:
        margin = (c - ref["chosen_logp"]) - (r - ref["rejected_logp"])
        values |= {"reward_accuracy": float(margin > 0), "reward_margin": margin}
    return values


def _stat(values: list[float], clusters: list[str]) -> dict:
    lo, hi = bootstrap_clustered_ci(values, clusters)
    mean = sum(values) / len(values) if values else 0.0
    return {"value": round(mean, 6), "ci95": [round(lo, 6), round(hi, 6)]}


def _measures(
    idx: list[int], sides: dict[str, list[dict]], clusters: list[str], start_is_ref: bool = False
) -> dict:
    """measure -> {model, start, delta}: each side's mean with its clustered interval, and the
    paired change start -> model, over the pairs `idx`. When the start is the reference, the
    implicit reward measures have no start side: the start's margins are 0 by definition (its
    accuracy 0 by the strict rule), so a "change" from it would read any movement, even one
    the wrong way for most pairs, as a gain. Their chance level is 50% and a margin of 0."""
    keys = [k for k in MEASURES if k in sides["model"][0]] if sides["model"] else []
    cl = [clusters[i] for i in idx]
    out = {}
    for key in keys:
        trivial = start_is_ref and key.startswith("reward_")
        entry = {side: _stat([v[i][key] for i in idx], cl) for side, v in sides.items()
                 if not (trivial and side == "start")}  # fmt: skip
        if "start" in sides and not trivial:
            diff = [sides["model"][i][key] - sides["start"][i][key] for i in idx]
            entry["delta"] = _stat(diff, cl)
        out[key] = entry
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    keys = ("chosen_logp", "rejected_logp")
    return a is b or all(x[k] == y[k] for x, y in zip(a, b, strict=True) for k in keys)


def preference_summary(
    model: list[dict], reference: list[dict] | None = None, start: list[dict] | None = None
) -> dict:
    """The summary of score_pairs records (see the module docstring): `model` is the model
    measured (after), `reference` the one its implicit reward is taken against, `start` the
    model it started from (before). All must be records of the same tokenised pairs."""
    if not model:
        raise InstillError("no pairs to measure")
    _check_aligned(model, reference, "reference")
    _check_aligned(model, start, "start")
    start_is_ref = start is not None and reference is not None and _same(start, reference)
    ref = reference or [None] * len(model)
    sides = {"model": [per_pair(m, r) for m, r in zip(model, ref, strict=True)]}
    if start is not None:
        sides["start"] = [per_pair(s, r) for s, r in zip(start, ref, strict=True)]
    clusters = [m["prompt"] for m in model]
    every = list(range(len(model)))
    longer = [i for i in every if model[i]["chosen_tokens"] > model[i]["rejected_tokens"]]
    others = [i for i in every if model[i]["chosen_tokens"] <= model[i]["rejected_tokens"]]
    n, is_longer = len(model), set(longer)
    return {
        "n": n,
        "prompts": len(set(clusters)),
        "measures": _measures(every, sides, clusters, start_is_ref),
        "lengths": {
            "chosen_tokens": round(sum(m["chosen_tokens"] for m in model) / n, 3),
            "rejected_tokens": round(sum(m["rejected_tokens"] for m in model) / n, 3),
            "chosen_longer": _stat([float(i in is_longer) for i in every], clusters),
        },
        "by_length": {
            name: {
                "n": len(idx),
                "measures": _measures(idx, sides, clusters, start_is_ref) if idx else {},
            }
            for name, idx in (("chosen_longer", longer), ("chosen_not_longer", others))
        },
        "note": ACCURACY_NOTE,
    }


def pair_records(
    model: list[dict], reference: list[dict] | None = None, start: list[dict] | None = None
) -> list[dict]:
    """One record per pair for preference.jsonl: its source (file:line), prompt key, reply
    token counts, and each scored model's summed log-probs."""
    out = []
    for i, m in enumerate(model):
        rec = {"id": m["id"], **{k: m[k] for k in _KEYS}}
        for name, side in (("model", model), ("reference", reference), ("start", start)):
            if side is not None:
                rec[name] = {"chosen_logp": side[i]["chosen_logp"],
                             "rejected_logp": side[i]["rejected_logp"]}  # fmt: skip
        out.append(rec)
    return out


def side_records(records: list[dict], name: str) -> list[dict] | None:
    """The score_pairs records of one side ("model", "reference", "start") of preference.jsonl
    records, or None when that side was not scored."""
    if not records or name not in records[0]:
        return None
    return [{"id": r["id"], **{k: r[k] for k in _KEYS}, **r[name]} for r in records]


def write_preference(folder: Path, summary: dict, records: list[dict], split: dict) -> Path:
    """<folder>/preference.jsonl, then <folder>/preference.json holding the records' sha256
    (a kill between the two leaves a pair the reader refuses) and `split` (the tokenised rows'
    sha256: results on other rows refuse to pair)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{PREFERENCE}.jsonl"
    write_jsonl(path, records, "preference records")
    data = {**summary, "split": split, RECORDS_SHA256: records_sha256(path)}
    out = folder / f"{PREFERENCE}.json"
    write_text(out, json.dumps(data, indent=2) + "\n", "preference summary")
    return out


def read_preference(folder: Path) -> tuple[dict, list[dict]] | None:
    """(summary, records) of <folder>/preference.json(l), or None when there is none."""
    summary = read_summary(Path(folder), PREFERENCE)
    if summary is None:
        return None
    return summary, read_records(Path(folder), PREFERENCE) or []


def pair_preference(before: Path, after: Path) -> dict:
    """The summary of `after`'s model against `before`'s (its start), with `after`'s reference:
    refused unless both were measured on the same tokenised pairs."""
    sides = []
    for folder in (before, after):
        got = read_preference(folder)
        if got is None:
            raise InstillError(f"{folder}: no {PREFERENCE}.json (instill eval-pairs writes it)")
        sides.append(got)
    (sa, ra), (sb, rb) = sides
    da, db = (sa.get("split") or {}).get("rows_sha256"), (sb.get("split") or {}).get("rows_sha256")
    if da is None or da != db:
        raise InstillError(
            f"{Path(before) / PREFERENCE}.json and {Path(after) / PREFERENCE}.json were measured "
            f"on different tokenised pairs (rows_sha256 {da!r} vs {db!r}: another file, "
            "--max-length or tokenizer), so their pairs cannot be paired; measure both on the "
            "same file with the same --max-length"
        )
    summary = preference_summary(
        side_records(rb, "model"), side_records(rb, "reference"), side_records(ra, "model")
    )
    # what print_preference names: B's model against B's reference, A's model as before
    names = {"model": f"{sb.get('model')} ({after})", "start": f"{sa.get('model')} ({before})",
             "reference": sb.get("reference"), "pairs": sb.get("pairs"),
             "max_length": sb.get("max_length"), "truncated": sb.get("truncated")}  # fmt: skip
    return summary | {k: v for k, v in names.items() if v is not None}


def preference_folder(name: str | Path) -> Path | None:
    """The folder of `name` that holds a preference.json (a run directory stands for its own
    eval/), or None when it holds none."""
    p = Path(name)
    for folder in (p / RUN_RESULTS, p):
        if (folder / f"{PREFERENCE}.json").is_file():
            return folder
    return None


def run_start(run_dir: Path) -> ModelConfig:
    """The model section a run started from (its config.yaml, read through the typed recipe):
    the default reference and "before" of a run's held-out pairs."""
    from instill.rundir import RunDir

    recipe = RunDir(run_dir).recipe()
    if recipe.model.init != "pretrained":
        raise InstillError(
            f"{run_dir}: the run started from random weights (model.init: {recipe.model.init}), "
            "so there is no starting model to measure against; give --reference MODEL"
        )
    return recipe.model


def _score_model(spec: ModelConfig, pairs: str, max_length: int, batch_size: int):
    """(records, rows' sha256, rows cut to fit) of one model on a pair file, tokenised by the
    model's own tokenizer and chat template."""
    from instill.models import load_for_inference

    loaded = load_for_inference(spec.name, spec)
    rows, truncated = pair_rows(loaded.tokenizer, pairs, max_length)
    records = score_pairs(loaded.model, loaded.tokenizer.pad_token_id, rows, batch_size)
    return records, rows_sha256(rows), truncated


def evaluate_pairs(
    model: ModelConfig,
    pairs: str,
    reference: ModelConfig | None = None,
    *,
    reference_is_start: bool = False,
    max_length: int = 512,
    batch_size: int = 8,
) -> tuple[dict, list[dict], dict]:
    """(summary, records, split) of `model` on the pairs of `pairs`, with the implicit reward
    against `reference` when given; `reference_is_start`: the reference is also the model
    `model` started from (a run's base), so its own preference is the "before" side. Models
    are loaded one at a time."""
    t0 = time.perf_counter()
    policy, digest, truncated = _score_model(model, pairs, max_length, batch_size)
    ref = None
    if reference is not None:
        ref, ref_digest, _ = _score_model(reference, pairs, max_length, batch_size)
        if ref_digest != digest:
            raise InstillError(
                f"the reference {reference.name} tokenises the pairs of {pairs} differently "
                f"from {model.name} (another tokenizer or chat template), so their log-probs "
                "cannot be compared; give a reference that shares the model's tokenizer"
            )
    summary = preference_summary(policy, ref, ref if reference_is_start else None)
    summary |= {
        "model": model.name,
        "reference": reference.name if reference is not None else None,
        "start": reference.name if reference_is_start and reference is not None else None,
        "pairs": str(pairs),
        "max_length": max_length,
        "truncated": truncated,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    records = pair_records(policy, ref, ref if reference_is_start else None)
    return summary, records, {"rows_sha256": digest}


def _cell(stat: dict | None, scale: float, signed: bool = False) -> str:
    if stat is None:
        return "—"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    if scale == 1:
        fmt = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = (scale * v for v in stat["ci95"])
    return f"{fmt.format(scale * stat['value'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def preference_rows(summary: dict) -> list[list[str]]:
    """Table rows (measure, start, model, change) with 95% intervals: accuracies in %, margins
    in nats, then the pairs' reply lengths."""
    rows = []
    for key, label in MEASURES.items():
        m = summary["measures"].get(key)
        if m is None:
            continue
        scale = 1.0 if "margin" in key else 100.0
        unit = "" if "margin" in key else " (%)"
        rows.append([label + unit, _cell(m.get("start"), scale), _cell(m["model"], scale),
                     _cell(m.get("delta"), scale, signed=True)])  # fmt: skip
    lengths = summary["lengths"]
    tokens = f"{lengths['chosen_tokens']:.1f} / {lengths['rejected_tokens']:.1f}"
    rows.append(["chosen / rejected reply tokens (mean)", "", tokens, ""])
    longer = _cell(lengths["chosen_longer"], 100.0)
    rows.append(["pairs whose chosen reply is longer (%)", "", longer, ""])
    return rows


def print_preference(summary: dict, out) -> None:
    """The summary as a rich table, with which models were scored."""
    from rich.table import Table

    start = summary.get("start")
    keep = (True, bool(start), True, bool(start))  # no start: no before and change columns
    table = Table(title=f"{summary['pairs']}: {summary['n']} pairs, {summary['prompts']} prompts")
    for col, kept in zip(("measure", "start (before)", "model", "change"), keep, strict=True):
        if kept:
            table.add_column(col, justify="left" if col == "measure" else "right")
    for row in preference_rows(summary):
        table.add_row(*[c for c, kept in zip(row, keep, strict=True) if kept])
    out.print(table)
    reference = summary.get("reference")
    out.print(
        f"model: {summary['model']}; reference: "
        + (f"{reference}" if reference else "none (implicit reward not measured; --reference)")
        + (f"; start (before): {start}" if start else ""),
        highlight=False,
    )
    if summary.get("truncated"):
        out.print(f"{summary['truncated']} pairs had a reply cut to fit --max-length "
                  f"{summary['max_length']}; they are scored on the part that fits")  # fmt: skip
    took = f"; {summary['wall_s']:.0f} s" if "wall_s" in summary else ""
    out.print(summary["note"] + took, highlight=False)
