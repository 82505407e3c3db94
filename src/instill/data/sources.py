"""Read rows from JSON, JSONL and CSV files, with errors that name the file and line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from instill.errors import InstillError

SUFFIXES = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class RawRow:
    data: dict
    file: str
    line: int  # 1-based line (JSONL, CSV) or row index + 1 (JSON array)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InstillError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InstillError(
            f"{path}:{line}: invalid UTF-8 (byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    if not text.strip():
        raise InstillError(f"{path}: file is empty")
    return text.removeprefix("\ufeff")


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every row of a data file; a folder yields the rows of its data files in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        if not files:
            raise InstillError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
        for f in files:
            yield from read_rows(f)
        return
    if not path.is_file():
        raise InstillError(f"{path}: data file not found")
    text = _text(path)
    name = str(path)
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InstillError(
                    f"{name}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(row, dict):
                raise InstillError(
                    f"{name}:{n}: each line must be a JSON object, got {type(row).__name__}"
                )
            yield RawRow(row, name, n)
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InstillError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise InstillError(f"{name}: expected a JSON array of objects")
        for i, row in enumerate(data, 1):
            if not isinstance(row, dict):
                raise InstillError(
                    f"{name}: item {i} must be a JSON object, got {type(row).__name__}"
                )
            yield RawRow(row, name, i)
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield RawRow(dict(row), name, reader.line_num)
    else:
        raise InstillError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
