"""Evaluation: a task is examples plus a scorer; results are written per example and summarised."""

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
