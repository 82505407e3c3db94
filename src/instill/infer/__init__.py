"""Generation: one engine (engine.py) behind one function, `generate`, used by evaluation, batch
generation and chat; the server runs the same engine from its decode thread."""

from instill.infer.generate import Generation, GenParams, generate

__all__ = ["GenParams", "Generation", "generate"]
