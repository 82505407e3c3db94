"""Run directory -> report.md: what the tuning did, in numbers."""

from instill.report.markdown import before_after_rows, write_report
from instill.report.plots import training_curves

__all__ = ["before_after_rows", "training_curves", "write_report"]
