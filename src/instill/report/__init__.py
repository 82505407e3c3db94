"""Run directory -> report.md and report.html: what the tuning did, in numbers and plots."""

from instill.report.plots import training_curves
from instill.report.run_report import build_run_report, write_run_report

__all__ = ["build_run_report", "training_curves", "write_run_report"]
