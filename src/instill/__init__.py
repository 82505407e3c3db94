"""instill: instruction-tune a pretrained language model, measure what it bought, serve it."""

__version__ = "0.1.0"
