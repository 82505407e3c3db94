"""An example to answer: a prompt (the conversation up to the reply to produce), its
reference(s) and how it is scored. Every evaluation task holds a list of them (eval/tasks.py), the
anchor prompts are read into them (anchors.py: general_gen and data.replay), and `instill pairs
make` samples replies to them (pairs.py); here, below all three, each imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalExample:
    id: str
    prompt: tuple[dict, ...]  # the conversation up to the reply to produce
    reference: str | tuple[str, ...]  # one reference, or several acceptable ones
    family: str = ""
    cluster: str = ""
    choices: tuple[str, ...] | None = None  # for the choice metric: the answers to rank
    scorer: object = None  # the built-in task's own scorer (metric "builtin")
    source: str = ""  # file:line (or the generator) the example came from, for error messages
