"""What differed between two runs of an experiment, read from their own records: config.yaml
(through the typed schema), run.json and data_stats.json. The transfer report opens with it,
so that what it says was alike or different is what the runs recorded, never a sentence
written in advance of them.

    run directory ─► record_figures (rows, tokens, steps, parameters, frozen, suites, ...)
                 └─► config_settings (every dotted key of the resolved config)
    two runs ─► differences / same ─► one sentence each
"""

from __future__ import annotations

import json
from pathlib import Path

from instill.config.load import yaml_text
from instill.rundir import RunDir

# Keys of config.yaml that name or steer a run without changing what it trains: the run's
# name is the arm's label, and train.resume is set when a training is continued (a resumed
# run trains the same steps on the same rows as an uninterrupted one).
NOT_SETTINGS = frozenset({"name", "train.resume"})
NOT_RECORDED = "not recorded"


def _frozen(config: dict) -> str:
    adapter = config["adapter"]
    if adapter["method"] == "lora":
        return "every base weight (only the LoRA adapters train)"
    return ", ".join(adapter["freeze"]) or "none"


def _names(names) -> str:
    return ", ".join(sorted(names or ())) or "none"


def _short(sha: str | None) -> str | None:
    return sha[:16] if sha and sha != NOT_RECORDED else sha  # a local directory has none


def record_figures(run_dir: Path) -> list[tuple[str, object]]:
    """(label, value) of what a run trained on and what it trained, in the report's order."""
    run = json.loads(RunDir(run_dir).record_file.read_text())
    stats_file = RunDir(run_dir).data_stats
    data = json.loads(stats_file.read_text()) if stats_file.is_file() else run.get("data", {})
    train, params = run.get("train", {}), run.get("params", {})
    config = config_settings(run_dir, flat=False)
    model = run.get("model", {})
    return [
        ("training rows", data.get("rows", NOT_RECORDED)),
        ("replay rows", data.get("replay_rows", NOT_RECORDED)),
        ("data tokens", data.get("tokens", NOT_RECORDED)),
        ("supervised tokens", data.get("trained_tokens", NOT_RECORDED)),
        ("validation rows", data.get("validation_rows", NOT_RECORDED)),
        ("truncated rows", data.get("truncated", NOT_RECORDED)),
        ("dropped rows", data.get("dropped", NOT_RECORDED)),
        ("steps", train.get("steps", NOT_RECORDED)),
        ("tokens trained on", train.get("tokens", NOT_RECORDED)),
        ("trainable parameters", params.get("trainable", NOT_RECORDED)),
        ("parameters", params.get("total", NOT_RECORDED)),
        ("frozen modules:", _frozen(config)),
        ("suites evaluated before tuning:", _names(run.get("eval_before"))),
        ("suites evaluated after tuning:", _names(run.get("eval_after"))),
        ("held-out clusters:", _names(run.get("holdout_clusters"))),
        ("objective", run.get("objective", NOT_RECORDED)),
        ("model file sha256", _short(model.get("sha256", NOT_RECORDED))),
        ("dtype", model.get("dtype", NOT_RECORDED)),
        ("device", model.get("device", NOT_RECORDED)),
    ]


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            out.update(flatten(value, f"{name}."))  # sections; a setting's own dict stays one
        else:
            out[name] = value
    return out


def config_settings(run_dir: Path, flat: bool = True) -> dict:
    """The run's resolved config, read through the typed schema: {dotted key: value}."""
    config = RunDir(run_dir).recipe().model_dump(mode="json")
    return flatten(config) if flat else config


def show(value: object) -> str:
    if value == {}:
        return "none"  # no rows dropped, no columns renamed
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return yaml_text(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _item(label: str, value: object) -> str:
    return f"{label} {show(value)}"


def differences(a: Path, b: Path) -> list[str]:
    """'label a-value vs b-value' for every recorded figure and every config setting in which
    run `a` and run `b` differ."""
    out = [
        f"{label} {show(x)} vs {show(y)}"
        for (label, x), (_, y) in zip(record_figures(a), record_figures(b), strict=True)
        if x != y
    ]
    ca, cb = config_settings(a), config_settings(b)
    for key in sorted(set(ca) | set(cb)):
        x, y = ca.get(key, NOT_RECORDED), cb.get(key, NOT_RECORDED)
        if key not in NOT_SETTINGS and x != y:
            out.append(f"{key} {show(x)} vs {show(y)}")
    return out


def same(a: Path, b: Path) -> list[str]:
    """'label value' for every recorded figure runs `a` and `b` share."""
    return [
        _item(label, x)
        for (label, x), (_, y) in zip(record_figures(a), record_figures(b), strict=True)
        if x == y and x != NOT_RECORDED
    ]


def comparison(a: Path, b: Path, subject: str, say_same: bool = True) -> str:
    """One sentence on two runs: what differed (or that nothing did), then what was the same.
    `subject` names the pair, e.g. 'The pretrained and the scratch run differed'."""
    diff = differences(a, b)
    if not diff:
        text = f"{subject} in nothing that config.yaml, run.json and data_stats.json record"
    else:
        text = (
            f"{subject} in: " + "; ".join(diff) + " (every other setting of their config.yaml "
            "was the same)"
        )
    shared = same(a, b) if say_same else []
    return text + (". The same in both: " + "; ".join(shared) + "." if shared else ".")
