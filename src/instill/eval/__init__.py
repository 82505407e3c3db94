"""Evaluation: a task is examples plus a scorer; results are written per example and summarised.

Below eval: the anchor prompts and the base model's replies (instill/anchors.py, shared with the
recipe's replay), EvalExample (data/examples.py) and per-row scoring (train/loss.py)."""

from instill.eval.metrics import bootstrap_ci
from instill.eval.runner import (
    SuiteResult,
    evaluate,
    load_result,
    write_result,
)

__all__ = [
    "SuiteResult",
    "bootstrap_ci",
    "evaluate",
    "load_result",
    "write_result",
]
