"""PNG plots from a run directory's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) from metrics.jsonl."""
    train, val = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (val if "val_loss" in record else train).append(record)
    return train, val


def training_curves(run_dir: Path) -> Path | None:
    """loss_curve.png: training and validation loss against step and tokens, and the learning
    rate. None when nothing was logged."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    train, val = read_metrics(metrics)
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_tok, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    ax_step.plot(steps, [r["loss"] for r in train], label="train")
    if val:
        ax_step.plot(
            [r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation"
        )
    ax_step.set(xlabel="step", ylabel="loss (per supervised token)", title="loss by step")
    ax_step.legend()
    ax_tok.plot([r["tokens"] for r in train], [r["loss"] for r in train])
    ax_tok.set(xlabel="tokens seen", ylabel="loss", title="loss by tokens")
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
