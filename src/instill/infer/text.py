"""A reply's text as its tokens arrive: incremental detokenization, stop strings, streaming.

    token ids, one at a time -> decode only the tail that changed -> whole characters only
      -> a stop string in the generated text? cut there, the reply ends
      -> stream what cannot be the start of a stop string (held back until it cannot be)

Only the generated text is searched: a stop string never completes across the prompt boundary
(a prompt ending in a newline and a stop of two newlines would otherwise end every reply early).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text up to its first stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return text, False
    return text[: min(hits)], True


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string (not streamed yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextStream:
    """One reply's text, grown token by token. The tokens `ids[start:read]` decode to the tail of
    `text` already made, so each token costs two short decodes, never the whole reply; a token
    that ends inside a multi-byte character waits for the rest (no U+FFFD is ever streamed)."""

    def __init__(self, tokenizer, stops: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stops, self.on_text = tokenizer, tuple(stops), on_text
        self.ids: list[int] = []
        self.start = self.read = 0
        self.text = ""
        self.sent = 0  # characters given to on_text

    def push(self, tid: int) -> bool:
        """Take one generated token; True when the text now holds a stop string."""
        self.ids.append(tid)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.start : self.read], skip_special_tokens=True)
        tail = decode(self.ids[self.start :], skip_special_tokens=True)
        if len(tail) <= len(prefix) or tail.endswith("\ufffd"):
            return False
        self.text += tail[len(prefix) :]
        self.start, self.read = self.read, len(self.ids)
        if self.stops and cut_at_stop(self.text, self.stops)[1]:
            return True
        ready = len(self.text) - held_back(self.text, self.stops)
        self._send(ready)
        return False

    def finish(self, final: str) -> None:
        """Stream the rest of the final text (one decode of all the tokens, cut at a stop)."""
        if len(final) > self.sent and final.startswith(self.text[: self.sent]):
            self._send(len(final), final)

    def _send(self, upto: int, text: str | None = None) -> None:
        text = self.text if text is None else text
        if upto > self.sent:
            if self.on_text is not None:
                self.on_text(text[self.sent : upto])
            self.sent = upto
