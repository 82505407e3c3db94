"""report.md from the files of a run directory (run.json, eval/*.json), nothing else."""

from __future__ import annotations

import json
from pathlib import Path


def before_after_rows(
    before: dict | None, after: dict | None
) -> list[tuple[str, float | None, float | None]]:
    """(label, base score, tuned score) per task family, then overall, for one suite."""
    fb, fa = (before or {}).get("by_family", {}), (after or {}).get("by_family", {})
    rows = [(f, fb.get(f), fa.get(f)) for f in sorted(set(fb) | set(fa))]
    rows.append(("overall", (before or {}).get("score"), (after or {}).get("score")))
    return rows


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def write_report(run_dir: Path) -> Path:
    run = json.loads((run_dir / "run.json").read_text())
    before, after, tr = run.get("eval_before"), run.get("eval_after"), run["train"]
    lines = [f"# instill run `{run['name']}`", ""]
    lines += [
        f"Base model: `{run['model']['name']}` ({run['model']['kind']}, "
        f"sha256 `{(run['model'].get('sha256') or 'n/a')[:16]}`), "
        f"{run['model']['device']}, {run['model']['dtype']}.",
        f"Trainable parameters: {run['params']['trainable']:,} of {run['params']['total']:,}.",
        "",
    ]
    for suite in sorted(set(before or {}) | set(after or {})):
        b, a = (before or {}).get(suite), (after or {}).get(suite)
        metric = (a or b)["metric"]
        lines += [
            f"## Suite `{suite}`: {metric} (%)",
            "",
            "| task family | base | tuned | delta |",
            "|---|---:|---:|---:|",
        ]
        for label, x, y in before_after_rows(b, a):
            delta = "—" if x is None or y is None else f"{100 * (y - x):+.1f}"
            name = f"**{label}**" if label == "overall" else label
            lines.append(f"| {name} | {_pct(x)} | {_pct(y)} | {delta} |")
        for tag, s in (("base", b), ("tuned", a)):
            if s:
                lo, hi = s["ci95"]
                lines.append(
                    f"\n{tag}: {_pct(s['score'])}% (95% CI {_pct(lo)}–{_pct(hi)}, n={s['n']})"
                )
        lines.append("")
    lines += [
        "## Training",
        "",
        f"- steps: {tr['steps']}, wall time: {tr['wall_s']:.1f} s",
        f"- tokens: {tr['tokens']:,} ({tr['trained_tokens']:,} supervised), "
        f"{tr['tokens_per_s']:.1f} tokens/s",
        f"- loss: {tr['first_loss']:.4f} (first step) → {tr['final_loss']:.4f} (last step)"
        + (
            f"; validation {tr['final_val_loss']:.4f}"
            if tr.get("final_val_loss") is not None
            else ""
        ),
        f"- peak memory: {tr['peak_mem_mb']:.0f} MiB",
        "",
        "## Data",
        "",
        f"- rows: {run['data']['rows']} of {run['data']['rows_in']}, truncated: "
        f"{run['data']['truncated']}, dropped: {run['data']['dropped'] or 'none'}",
        f"- tokens: {run['data']['tokens']:,}, trained: {run['data']['trained_tokens']:,}",
        "",
    ]
    if (run_dir / "loss_curve.png").is_file():
        lines += ["## Training curves", "", "![loss, tokens and learning rate](loss_curve.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
