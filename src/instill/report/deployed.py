"""The run report's "Deployed" section: each exported GGUF as llama.cpp answers it, beside the
tuned model in memory.

    RUN/eval/deployed/NAME/<suite>.json(l)   `instill eval EXPORT --engine llama.cpp` (its
                                             summary's "deployed": the export's kind, size,
                                             verification and instill.json sha256)
    RUN/eval/<suite>.jsonl                   the tuned model in memory (instill train)
    RUN/export/*/instill.json                exports not scored yet: verification only

Scores are compared on the examples both sides answered (paired by id), so a deployed eval on
another split is never set against a different set of prompts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from instill.eval.results import read_records, read_summary, result_stems
from instill.report.document import Heading, Para, Table
from instill.rundir import MANIFEST, RunDir

GGUF = ("gguf", "gguf-lora")


def _artifact(d: dict) -> str:
    kind = "adapter" if d.get("format") == "gguf-lora" else "merged"
    return f"{kind} {d.get('quant')}"


def _size(d: dict) -> str:
    if d.get("size_bytes") is None:
        return "—"
    mb = f"{d['size_bytes'] / 1e6:.1f}"
    if d.get("format") == "gguf-lora" and d.get("base_size_bytes"):
        return f"{d['base_size_bytes'] / 1e6:.1f} + {mb}"
    return mb


def _verified(d: dict) -> tuple[str, str]:
    v = d.get("verification") or {}
    if not v:
        return "—", "—"
    return v.get("verifier", "—"), f"{v['greedy_agreement']:.3f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _state(d: dict) -> str:
    """Whether the scored export is still the one in its folder."""
    manifest = Path(d["export"]) / MANIFEST
    if not manifest.is_file():
        return " (export since removed)"
    if hashlib.sha256(manifest.read_bytes()).hexdigest() != d.get("manifest_sha256"):
        return " (an earlier export; score it again)"
    return ""


def _by_id(records: list[dict] | None) -> dict[str, dict]:
    return {r["id"]: r for r in records or [] if "id" in r}


def deployed_rows(run_dir: Path) -> tuple[list[list[str]], list[str]]:
    """Table rows (scored exports, then unscored GGUF exports) and one line per scored one:
    "exported merged q8_0: X% vs Y% in memory"."""
    rows, lines, scored = [], [], set()
    for folder in RunDir(run_dir).deployed_scores():
        for stem in result_stems(folder):
            summary = read_summary(folder, stem)
            d = summary.get("deployed")
            if not d:
                continue
            scored.add(d["export"])
            suite = summary["suite"]
            deployed = _by_id(read_records(folder, stem))
            memory = _by_id(read_records(RunDir(run_dir).results, suite))
            both = [i for i in deployed if i in memory]
            dep = mem = same = None
            if both:
                dep = sum(deployed[i]["score"] for i in both) / len(both)
                mem = sum(memory[i]["score"] for i in both) / len(both)
                same = sum(deployed[i]["prediction"] == memory[i]["prediction"] for i in both)
                same /= len(both)
            verifier, agreement = _verified(d)
            label = _artifact(d) + _state(d)
            rows.append(
                [label, verifier, _size(d), agreement, suite, _pct(dep), _pct(mem), _pct(same),
                 str(len(both))]
            )  # fmt: skip
            if both:
                lines.append(
                    f"exported {label}: {_pct(dep)}% vs {_pct(mem)}% in memory ({suite}, "
                    f"{len(both)} prompts; {_pct(same)}% of answers identical)"
                )
            else:
                lines.append(
                    f"exported {label}: {_pct(summary.get('score'))}% on {suite} "
                    f"(n={summary.get('n')}); no in-memory answers to the same prompts in "
                    f"{RunDir(run_dir).results}"
                )
    for manifest_file in RunDir(run_dir).export_manifests():
        folder = manifest_file.parent.resolve()
        manifest = json.loads(manifest_file.read_text())
        export = manifest.get("export") or {}
        if export.get("format") not in GGUF or str(folder) in scored:
            continue
        base = export.get("base_gguf") or {}
        d = {**export, "base_size_bytes": base.get("size_bytes"),
             "verification": manifest.get("verification")}  # fmt: skip
        verifier, agreement = _verified(d)
        rows.append([_artifact(d), verifier, _size(d), agreement, "not scored", "—", "—", "—", "0"])
        lines.append(
            f"exported {_artifact(d)}: not scored; instill eval {manifest_file.parent} "
            "--engine llama.cpp"
        )
    return rows, lines


def deployed_blocks(run_dir: Path) -> list:
    rows, lines = deployed_rows(run_dir)
    if not rows:
        return []
    header = ["export", "verified by", "size MB", "verify agreement", "suite",
              "deployed (%)", "in memory (%)", "answers identical (%)", "n"]  # fmt: skip
    return [
        Heading("Deployed: the exported GGUF files as llama.cpp answers them"),
        *[Para(line) for line in lines],
        Table(header, rows, "llrrlrrrr"),
        Para(
            "Verify agreement: greedy agreement with the tuned model on the export's 6 "
            "verification prompts. Deployed and in memory: the task score of the same prompts, "
            "answered by llama.cpp (instill eval EXPORT --engine llama.cpp) and by the tuned "
            "model in memory; an adapter's size is the base GGUF's plus the adapter's."
        ),
    ]
