"""Run directory -> report.md: what the tuning did, in numbers."""

from instill.report.markdown import before_after_rows, write_report

__all__ = ["before_after_rows", "write_report"]
