"""PNG plots from a run directory's metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from instill import rundir
from instill.jsonl import read_jsonl
from instill.rundir import RunDir


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) from metrics.jsonl."""
    train, val = [], []
    for record in read_jsonl(path, torn_tail=True):
        if "val_loss" in record:
            val.append(record)
        elif "loss" in record:  # (eval_score records are read by the report directly)
            train.append(record)
    return train, val


def training_curves(run_dir: Path) -> Path | None:
    """loss_curve.png: training and validation loss against step and tokens, and the learning
    rate. None when nothing was logged."""
    metrics = RunDir(run_dir).metrics
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
    # a KTO step whose rows were all undesirable (or all desirable) logs one side only
    preference = any("chosen_logp" in r or "rejected_logp" in r for r in train)
    unit = "per supervised token"
    if preference:
        unit = "per pair" if "pairs" in train[0] else "per row"
    ax_step.set(xlabel="step", ylabel=f"loss ({unit})", title="loss by step")
    ax_step.legend()
    if preference:  # a chosen log-prob that falls while the margin grows is visible here
        for side, style in (("chosen", "-"), ("rejected", "--")):
            logged = [r for r in train if f"{side}_logp" in r]
            ax_tok.plot([r["step"] for r in logged], [r[f"{side}_logp"] for r in logged], style,
                        label=side)  # fmt: skip
            points = [r for r in val if f"val_{side}_logp" in r]
            if points:
                ax_tok.plot([r["step"] for r in points], [r[f"val_{side}_logp"] for r in points],
                            "o" + style, label=f"{side} (validation)")  # fmt: skip
        ax_tok.set(xlabel="step", ylabel="mean log-prob per reply token",
                   title="chosen and rejected replies")  # fmt: skip
        ax_tok.legend()
    else:
        ax_tok.plot([r["tokens"] for r in train], [r["loss"] for r in train])
        ax_tok.set(xlabel="tokens seen", ylabel="loss", title="loss by tokens")
    ax_lr.plot(steps, [r["lr"] for r in train])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out = RunDir(run_dir).plot(rundir.LOSS_PLOT)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(rows, side: str):
    """Asymmetric error bars (in points) from each row's own 95% interval."""
    lo, hi = [], []
    for r in rows:
        mean, ci = getattr(r, side), getattr(r, f"ci_{side}")
        if mean is None or ci is None:
            lo.append(0.0)
            hi.append(0.0)
        else:
            lo.append(100 * (mean - ci[0]))
            hi.append(100 * (ci[1] - mean))
    return [lo, hi]


def _bars(ax, labels, series, title, ylabel):
    """Grouped bars: series is [(name, values, (low errors, high errors))]."""
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for k, (name, values, err) in enumerate(series):
        vals = [100 * (v or 0) for v in values]
        ax.bar(
            x + (k - (len(series) - 1) / 2) * width,
            vals,
            width,
            label=name,
            yerr=err,
            capsize=3 if err is not None else 0,
        )
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set(title=title, ylabel=ylabel, ylim=(0, 105))
    ax.legend(fontsize=8)


def performance(
    run_dir: Path, tables: list[dict], out_name: str = rundir.PERFORMANCE_PLOT
) -> Path | None:
    """performance.png: base vs tuned per suite, overall and per cluster (scores in %; drift
    suites, in nats per token, are tabled in the report instead)."""
    tables = [t for t in tables if t["metric"] != "drift"]
    if not tables:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables) + 1, 4), squeeze=False)
    for ax, t in zip(axes[0], tables, strict=True):
        rows = [r for r in t["rows"] if "clusters" not in r.label]
        labels = [r.label.strip().replace(" (unseen)", "*") for r in rows]
        _bars(
            ax,
            labels,
            [
                ("base", [r.a for r in rows], _err(rows, "a")),
                ("tuned", [r.b for r in rows], _err(rows, "b")),
            ],
            f"{t['suite']} ({t['metric']})",
            "score (%)",
        )
    fig.tight_layout()
    out = run_dir / out_name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def generalisation(run_dir: Path, tables: list[dict]) -> Path | None:
    """generalisation.png: seen vs held-out clusters, before and after, per suite."""
    held = [t for t in tables if any(r.label == "unseen clusters" for r in t["rows"])]
    if not held:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(held), figsize=(4.5 * len(held) + 1, 3.8), squeeze=False)
    for ax, t in zip(axes[0], held, strict=True):
        rows = {r.label: r for r in t["rows"]}
        seen, unseen = rows["seen clusters"], rows["unseen clusters"]
        _bars(
            ax,
            ["seen clusters", "unseen clusters"],
            [
                ("base", [seen.a, unseen.a], _err([seen, unseen], "a")),
                ("tuned", [seen.b, unseen.b], _err([seen, unseen], "b")),
            ],
            f"{t['suite']} ({t['metric']})",
            "score (%)",
        )
    fig.tight_layout()
    out = RunDir(run_dir).plot(rundir.GENERALISATION_PLOT)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _side_err(summaries: list[dict | None], key: str = "") -> list[list[float]]:
    lo, hi = [], []
    for s in summaries:
        part = (s or {}).get(key) if key else s
        if not part:
            lo.append(0.0)
            hi.append(0.0)
            continue
        lo.append(100 * (part["score"] - part["ci95"][0]))
        hi.append(100 * (part["ci95"][1] - part["score"]))
    return [lo, hi]


def _score(s: dict | None, key: str = "") -> float | None:
    part = (s or {}).get(key) if key else s
    return part["score"] if part else None


WAY_NAMES = ("pretrained, untuned", "scratch, tuned", "pretrained, tuned")


def three_way(
    folder: Path, ways: dict[str, tuple], name: str, names: tuple = WAY_NAMES
) -> Path | None:
    """Overall score per suite for each way (`names`, in the order of each tuple in `ways`),
    with 95% intervals."""
    if not ways:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5 * len(ways) + 3, 4))
    suites = list(ways)
    series = [
        (way, [_score(ways[s][k]) for s in suites], _side_err([ways[s][k] for s in suites]))
        for k, way in enumerate(names)
    ]
    _bars(ax, suites, series, "score by suite", "score (%)")
    fig.tight_layout()
    out = folder / name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def three_way_seen(folder: Path, ways: dict[str, tuple], names: tuple = WAY_NAMES) -> Path | None:
    """Seen and held-out clusters for each way (`names`, as in three_way)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(ways), figsize=(5 * len(ways) + 1, 4), squeeze=False)
    for ax, (suite, w) in zip(axes[0], ways.items(), strict=True):
        series = []
        for k, way in enumerate(names):
            (lo_s,), (hi_s,) = _side_err([w[k]], "seen")
            (lo_u,), (hi_u,) = _side_err([w[k]], "unseen")
            vals = [_score(w[k], "seen"), _score(w[k], "unseen")]
            series.append((way, vals, [[lo_s, lo_u], [hi_s, hi_u]]))
        _bars(ax, ["seen clusters", "unseen clusters"], series, suite, "score (%)")
    fig.tight_layout()
    out = folder / "transfer_generalisation.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def transfer_curves(folder: Path, pre: list, scratch: list) -> Path | None:
    """Validation loss against tokens seen, from the pretrained and the random start."""
    if not pre or not scratch:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p[1] for p in pre], [p[3] for p in pre], "o-", label="pretrained start")
    ax.plot([p[1] for p in scratch], [p[3] for p in scratch], "s-", label="scratch start")
    best = min(p[3] for p in scratch)
    ax.axhline(best, color="grey", linestyle="--", linewidth=1, label="scratch best")
    ax.set(xlabel="tokens seen", ylabel="validation loss", title="validation loss by start")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    out = folder / "transfer_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cost_bars(folder: Path, costs: dict[str, dict]) -> Path:
    """Training seconds and estimated FLOPs per start."""
    plt = _plt()
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(costs)
    ax_t.bar(names, [costs[n]["train_s"] for n in names], color=["C2", "C1", "C0"][: len(names)])
    ax_t.set(title="training time", ylabel="seconds")
    ax_f.bar(names, [costs[n]["flops"] for n in names], color=["C2", "C1", "C0"][: len(names)])
    ax_f.set(title="estimated training FLOPs", ylabel="FLOPs")
    fig.tight_layout()
    out = folder / "transfer_cost.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
