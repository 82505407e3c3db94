"""Export a run's tuned model as an HF directory or a GGUF file, verified and with provenance."""

from instill.export.run import ExportResult, export_run

__all__ = ["ExportResult", "export_run"]
