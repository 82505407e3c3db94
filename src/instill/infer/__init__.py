"""Generation: one engine (engine.py) behind one function, `generate`, used by evaluation, batch
generation and chat; the server runs the same engine from its decode thread. llama.cpp
(llamacpp.py, optional) is the second engine, for GGUF files: one decode loop for `eval` and
`serve --engine llama.cpp`, ending replies by the same rules (engine.end_reply)."""

from instill.infer.generate import Generation, GenParams, generate

__all__ = ["GenParams", "Generation", "generate"]
