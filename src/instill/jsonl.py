"""The one JSONL reader and writer: one JSON object per line, lines split on "\\n" only.

Records are written with ensure_ascii=False, so text may hold U+2028, U+0085 and other characters
that str.splitlines() treats as line breaks; splitting on "\\n" alone keeps such a record whole.
Every JSONL file instill reads or writes (data, eval records, metrics, generate input and output,
prompt files) goes through here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from instill.errors import InstillError


def dumps(record) -> str:
    """One record as one line (no trailing newline)."""
    return json.dumps(record, ensure_ascii=False)


def lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for each non-blank line of a JSONL text."""
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield i, line


def read_text(path: Path) -> str:
    """A text file decoded as UTF-8; a file that cannot be read, or is not UTF-8, is an error
    naming it (and the line of the first bad byte)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InstillError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InstillError(
            f"{path}:{line}: invalid UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
        ) from None


def read_jsonl(path: Path, *, torn_tail: bool = False) -> list:
    """Every record of a JSONL file; a line that is not JSON is an error naming file and line.

    torn_tail=True is for files instill appends to while running (metrics.jsonl): a last line
    that has no newline and does not parse was cut by a kill mid-write, and is dropped. A file a
    user wrote may lack the final newline; its last line is then read like any other."""
    text = read_text(path)
    out = []
    last = text.count("\n") + 1
    for i, line in lines(text):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if torn_tail and i == last:
                break
            raise InstillError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
    return out


def write_jsonl(path: Path, records: Iterable, what: str = "records") -> None:
    """Write a whole JSONL file atomically (instill.atomic.atomic_file): a kill leaves the old
    file or the new one, never half of either; a full or read-only disk is an error naming it."""
    from instill.atomic import atomic_file

    with atomic_file(Path(path), what) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in records)
