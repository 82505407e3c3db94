"""final/README.md: the tuned model's card, written at the end of the run once its scores are
known (after peft's save_pretrained, which writes an empty template there). Hugging Face hub
YAML front matter (base_model, library_name, license where known, tags) so the hub renders it,
then what the model is, its data, its recipe, its headline scores with intervals, its intended
use and its limits, all from the run's own files."""

from __future__ import annotations

from pathlib import Path

import yaml

from instill.atomic import write_text
from instill.report.claims import (
    forgetting_verdict,
    generalisation_verdict,
    is_guard,
    performance_verdict,
    row,
)
from instill.report.document import mark
from instill.report.run_report import load_run, suite_tables
from instill.report.summary import read_recipe, recipe_rows
from instill.rundir import RunDir

CARD = "README.md"


def base_model(run: dict) -> tuple[str | None, str | None]:
    """(the base model's hub id, its licence), each None where instill does not know it."""
    from instill.models.resolve import ALIASES

    m = run["model"]
    if m["name"] in ALIASES:
        alias = ALIASES[m["name"]]
        return alias.hub_id, alias.license
    hub = m["name"] if m["kind"] == "hub" else None
    return hub, _card_license(Path(m["path"]) / CARD) if m.get("path") else None


def _card_license(card: Path) -> str | None:
    """The licence in a local model directory's own card front matter, if it has one."""
    try:
        text = card.read_text(encoding="utf-8")
        if text.startswith("---\n"):
            meta = yaml.safe_load(text[4 : text.index("\n---", 4)])
            value = meta.get("license") if isinstance(meta, dict) else None
            return value if isinstance(value, str) else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None


def front_matter(run: dict, recipe) -> dict:
    hub, license_ = base_model(run)
    lora = recipe is None or recipe.adapter.method == "lora"
    objective = (run.get("objective") or {}).get("name", "sft")
    meta: dict = {}
    if hub:
        meta["base_model"] = hub
    meta["library_name"] = "peft" if lora else "transformers"
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["instill", "lora" if lora else "full-fine-tune", objective]
    if hub and lora:  # the tag by which the hub lists an adapter under its base model
        meta["tags"].append(f"base_model:adapter:{hub}")
    return meta


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cell(c) for c in r) + " |" for r in rows),
    ]


def scores(tables: list[dict]) -> list[list[str]]:
    """Each suite's overall score, base against tuned, with the change's 95% interval."""
    out = []
    for t in tables:
        r = row(t, "overall")
        if t["metric"] == "drift" or r is None or r.delta is None:
            continue
        ci = f"{100 * r.ci[0]:+.1f} to {100 * r.ci[1]:+.1f}" if r.ci else "—"
        kind = "forgetting guard" if is_guard(t) else "task suite"
        out.append([f"{t['suite']} ({kind}, {t['metric']}, %)", f"{100 * r.a:.1f}",
                    f"{100 * r.b:.1f}", f"{100 * r.delta:+.1f}", ci, str(r.n_b)])  # fmt: skip
    return out


def model_card(run_dir: Path) -> str:
    run = load_run(run_dir)
    recipe, why = read_recipe(run_dir)
    tables = suite_tables(run_dir)
    meta = front_matter(run, recipe)
    base = meta.get("base_model") or run["model"]["name"]
    lora = meta["library_name"] == "peft"
    what = "A LoRA adapter" if lora else "A fully fine-tuned model"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {run['name']}: {base}, instruction-tuned with instill",
        "",
        f"{what} for **{base}**, trained by instill "
        f"(`instill train`, run `{run['name']}`). The run's full report, with every number's "
        "interval and the examples behind it, is `report.md` / `report.html` in the run "
        "directory, one level up from this folder.",
        "",
        "Load it with "
        + (
            "peft (`AutoPeftModelForCausalLM.from_pretrained` on this folder)"
            if lora
            else "transformers (`AutoModelForCausalLM.from_pretrained`)"
        )
        + ", or chat with it: `instill chat <this folder>`.",  # fmt: skip
        "",
        "## Training data",
        "",
    ]
    d = run["data"]
    for name, n in (d.get("formats") or {}).items():
        lines.append(f"- {name}: {n:,} rows read")
    lines.append(
        f"- trained on {d['rows']:,} rows ({d.get('replay_rows', 0):,} of them replay rows: the "
        f"base model's own replies), {d['tokens']:,} tokens; {d.get('validation_rows', 0):,} "
        "validation rows"
    )
    lines += ["", "## Recipe", ""]
    lines += _table(["setting", "value"], recipe_rows(recipe, run)) if recipe else [why]
    lines += ["", "## Results", ""]
    rows = scores(tables)
    if rows:
        lines += [
            "Base model against this model on held-out examples (the change's 95% interval is "
            "a paired bootstrap over the same examples):",
            "",
            *_table(["suite", "base", "tuned", "change (points)", "95% CI", "n"], rows),
            "",
        ]
    else:
        lines += ["No suite was evaluated before and after tuning.", ""]
    verdicts = (performance_verdict, generalisation_verdict, forgetting_verdict)
    for v in (verdict(tables) for verdict in verdicts):
        lines.append(f"- **{v.claim}: {mark(v)}.** {v.text}")
    lines += [
        "",
        "## Intended use",
        "",
        "Following short instructions of the kinds in the training data above, and studying "
        "what instruction tuning changes in this base model (the report measures it). It is a "
        "research artefact: check it on your own prompts before relying on it.",
        "",
        "## Limits",
        "",
        f"- It inherits {base}'s knowledge, biases, languages and licence"
        + (f" ({meta['license']})" if meta.get("license") else "")
        + "; tuning adds no safety training.",
        "- The scores above come from the suites listed, on a few held-out examples each: "
        "read them with their intervals, and expect other numbers on other tasks.",
        "- Replies are limited to what the run evaluated (greedy decoding, the generation "
        "lengths in the recipe); longer or sampled generations were not measured.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path) -> Path | None:
    """final/README.md for a run that has a final model (replacing peft's template)."""
    final = RunDir(run_dir).final
    if not final.is_dir():
        return None
    write_text(final / CARD, model_card(run_dir), "the model card", "train.output_dir")
    return final / CARD
