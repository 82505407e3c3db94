"""Generation: one function used by chat, batch generation, evaluation and serving."""

from instill.infer.generate import Generation, GenParams, generate

__all__ = ["GenParams", "Generation", "generate"]
