"""Verifiable constraints on a reply, in the manner of IFEval: each kind has an instruction a
prompt can carry and a checker that decides, without a model, whether a reply obeys it.

The built-in suite layers them on tasks (``data/builtin.py``, cluster ``constraints``) and scores
those examples strictly: 1 only when the reply obeys every constraint of its prompt. Checks are
strict in the IFEval sense: the reply is taken as written, after stripping surrounding
whitespace, with no attempt to repair it (no dropping of a leading "Sure!", no lower-casing),
and an empty reply obeys no constraint.

Kinds and what each checks:

- ``lowercase``: no upper-case letter, and at least one letter.
- ``max_words`` (n): between 1 and n words (a word is a run of non-space characters).
- ``json_keys`` (keys): the reply is one JSON object (optionally in a ```json fence) whose keys
  are exactly ``keys``.
- ``bullets`` (n): exactly n non-empty lines, each starting with "- " or "* ".
- ``include_word`` (word): the word occurs as a whole word, ignoring case.
- ``avoid_word`` (word): the word does not occur as a whole word, ignoring case.
- ``end_with`` (phrase): the reply ends with the phrase exactly (case and punctuation included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Constraint", "KINDS", "check", "check_all", "parse_json"]


def parse_json(text: str):
    """``json.loads`` of a reply, also inside a Markdown code fence (```json ... ```)."""
    s = text.strip()
    fence = re.fullmatch(r"```[A-Za-z]*\s*\n?(.*?)\n?\s*```", s, flags=re.DOTALL)
    if fence:
        s = fence.group(1).strip()
    return json.loads(s)


def _word_re(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def _lowercase(text: str) -> bool:
    return text == text.lower() and any(c.isalpha() for c in text)


def _max_words(text: str, n: int) -> bool:
    return 1 <= len(text.split()) <= n


def _json_keys(text: str, keys: list[str]) -> bool:
    try:
        obj = parse_json(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and sorted(obj) == sorted(keys)


def _bullets(text: str, n: int) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) == n and all(line[:2] in ("- ", "* ") and line[2:].strip() for line in lines)


def _include_word(text: str, word: str) -> bool:
    return bool(_word_re(word).search(text))


def _avoid_word(text: str, word: str) -> bool:
    return not _word_re(word).search(text)


def _end_with(text: str, phrase: str) -> bool:
    return text.endswith(phrase)


@dataclass(frozen=True)
class Kind:
    check: Callable[..., bool]
    args: tuple[str, ...]
    instruction: str  # str.format template over args


KINDS: dict[str, Kind] = {
    "lowercase": Kind(_lowercase, (), "Write your whole answer in lowercase letters."),
    "max_words": Kind(_max_words, ("n",), "Use at most {n} words."),
    "json_keys": Kind(
        _json_keys, ("keys",), "Answer with a JSON object with exactly the keys {keys}."
    ),
    "bullets": Kind(
        _bullets,
        ("n",),
        "Format the answer as a bulleted list of exactly {n} lines starting with '- '.",
    ),
    "include_word": Kind(_include_word, ("word",), "Include the word '{word}'."),
    "avoid_word": Kind(_avoid_word, ("word",), "Do not use the word '{word}'."),
    "end_with": Kind(_end_with, ("phrase",), "End your answer with the exact phrase '{phrase}'."),
}


@dataclass(frozen=True)
class Constraint:
    """One constraint: a kind from :data:`KINDS` and its arguments (hashable values)."""

    kind: str
    args: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, kind: str, **args) -> Constraint:
        if kind not in KINDS:
            raise ValueError(f"unknown constraint {kind!r}; valid kinds: {', '.join(KINDS)}")
        want = set(KINDS[kind].args)
        if set(args) != want:
            raise ValueError(
                f"constraint {kind!r} takes arguments {sorted(want)}; got {sorted(args)}"
            )
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
        return cls(kind, tuple(sorted(frozen.items())))

    @property
    def kwargs(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.args}

    def instruction(self) -> str:
        """The sentence a prompt carries to ask for this constraint."""
        kw = self.kwargs
        if "keys" in kw:
            kw["keys"] = ", ".join(f'"{k}"' for k in kw["keys"])
        return KINDS[self.kind].instruction.format(**kw)

    def check(self, reply: str) -> bool:
        """Whether the reply obeys the constraint; an empty reply obeys none."""
        text = reply.strip()
        return bool(text) and KINDS[self.kind].check(text, **self.kwargs)

    def name(self) -> str:
        """Kind plus arguments, for records: ``max_words(n=5)``."""
        inner = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.kind}({inner})" if inner else self.kind


def check(constraint: Constraint, reply: str) -> bool:
    return constraint.check(reply)


def check_all(constraints: tuple[Constraint, ...], reply: str) -> dict[str, bool]:
    """Each constraint's name and whether the reply obeys it."""
    return {c.name(): c.check(reply) for c in constraints}
