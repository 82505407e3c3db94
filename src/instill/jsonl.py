"""The one JSONL reader and writer: one JSON object per line, lines split on "\\n" only.

Records are written with ensure_ascii=False, so text may hold U+2028, U+0085 and other characters
that str.splitlines() treats as line breaks; splitting on "\\n" alone keeps such a record whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from instill.errors import InstillError


def dumps(record) -> str:
    return json.dumps(record, ensure_ascii=False)


def read_jsonl(path: Path) -> list:
    """Every record of a JSONL file; a line that is not JSON is an error naming file and line."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InstillError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
    return out


def write_jsonl(path: Path, records: Iterable) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(dumps(r) + "\n")
