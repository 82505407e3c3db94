"""report.md and loss_curve.png from a small recorded run directory."""

import json

from instill.report import training_curves, write_report
from instill.report.plots import read_metrics

RUN = {
    "name": "recorded",
    "model": {
        "name": "smollm2-135m-instruct",
        "kind": "gguf",
        "path": "/x",
        "sha256": "ab" * 32,
        "device": "cpu",
        "dtype": "float32",
    },
    "params": {"trainable": 100, "total": 1000},
    "train": {
        "steps": 4,
        "wall_s": 2.0,
        "tokens": 400,
        "trained_tokens": 40,
        "tokens_per_s": 200.0,
        "first_loss": 3.0,
        "final_loss": 1.0,
        "final_val_loss": 1.5,
        "peak_mem_mb": 10.0,
    },
    "data": {
        "rows": 8,
        "rows_in": 9,
        "truncated": 0,
        "dropped": {"x": 1},
        "tokens": 400,
        "trained_tokens": 40,
    },
    "eval_before": {
        "builtin": {
            "metric": "builtin",
            "score": 0.25,
            "ci95": [0.0, 0.5],
            "n": 4,
            "by_family": {"addition": 0.5, "uppercase": 0.0},
        }
    },
    "eval_after": {
        "builtin": {
            "metric": "builtin",
            "score": 0.75,
            "ci95": [0.5, 1.0],
            "n": 4,
            "by_family": {"addition": 1.0, "uppercase": 0.5},
        }
    },
}
METRICS = [
    {"step": 2, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens": 200, "tokens_per_s": 200.0},
    {"step": 2, "val_loss": 2.5},
    {"step": 4, "loss": 1.0, "lr": 5e-4, "grad_norm": 0.5, "tokens": 400, "tokens_per_s": 200.0},
    {"step": 4, "val_loss": 1.5},
]


def make_run(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    return tmp_path


def test_report_figures_match_the_recorded_run(tmp_path):
    run = make_run(tmp_path)
    assert training_curves(run).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = write_report(run).read_text()
    assert "| addition | 50.0 | 100.0 | +50.0 |" in text
    assert "| uppercase | 0.0 | 50.0 | +50.0 |" in text
    assert "| **overall** | 25.0 | 75.0 | +50.0 |" in text
    assert "tuned: 75.0% (95% CI 50.0–100.0, n=4)" in text
    assert "3.0000 (first step) → 1.0000 (last step); validation 1.5000" in text
    assert "200.0 tokens/s" in text and "![loss, tokens and learning rate](loss_curve.png)" in text


def test_metrics_split_into_training_and_validation(tmp_path):
    train, val = read_metrics(make_run(tmp_path) / "metrics.jsonl")
    assert [r["step"] for r in train] == [2, 4] and [r["val_loss"] for r in val] == [2.5, 1.5]
