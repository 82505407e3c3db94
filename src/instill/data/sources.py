"""Read rows from JSON, JSONL, CSV and Parquet files (or hub datasets), with errors that name
the file and line."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from instill import jsonl
from instill.errors import InstillError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class RawRow:
    data: dict
    file: str
    line: int  # 1-based line (JSONL, CSV) or row index + 1 (JSON array)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def read_source(
    path: str, split: str = "train", skipped: list[dict] | None = None
) -> Iterator[RawRow]:
    """Rows of a local file or folder, or of a hub dataset (for users who are online).

    With `skipped`, lines that are not JSON objects are recorded there instead of raised.
    """
    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")) or local.suffix in SUFFIXES:
        yield from read_rows(local, skipped)
        return
    if not _HUB_NAME.match(path):
        raise InstillError(f"{path}: data file not found")
    try:
        from datasets import load_dataset

        dataset = load_dataset(path, split=split)
    except Exception as exc:  # offline, unknown name, missing split: all end here
        raise InstillError(
            f"{path}: not a local file, and loading it as a hub dataset failed ({exc})"
        ) from None
    for i, row in enumerate(dataset, 1):
        yield RawRow(dict(row), f"{path}[{split}]", i)


def convert_source(
    path: str,
    fmt: str,
    split: str,
    skipped: list[dict] | None,
    columns: dict[str, str] | None,
    detect: Callable[[dict], str],
    convert: Callable[[RawRow, str], list],
) -> tuple[list, str]:
    """Every row of one source converted by `convert(row, fmt)` (a list per row), and the
    format: `detect` reads it from the first row when `fmt` is "auto". `columns` renames a row's
    keys (old -> new) before that; with `skipped`, a bad row is recorded there ({"where",
    "reason"}) instead of raised. One loop for supervised and preference sources alike."""
    out: list = []
    for raw in read_source(path, split, skipped):
        if columns:
            raw = RawRow({columns.get(k, k): v for k, v in raw.data.items()}, raw.file, raw.line)
        try:
            if fmt == "auto":
                try:
                    fmt = detect(raw.data)
                except InstillError as exc:
                    raise InstillError(f"{raw.where}: {exc}") from None
            out.extend(convert(raw, fmt))
        except InstillError as exc:
            if skipped is None:
                raise
            skipped.append({"where": raw.where, "reason": str(exc)})
    return out, fmt


def _text(path: Path) -> str:
    text = jsonl.read_text(path)
    if not text.strip():
        raise InstillError(f"{path}: file is empty")
    return text.removeprefix("\ufeff")


def read_rows(path: str | Path, skipped: list[dict] | None = None) -> Iterator[RawRow]:
    """Yield every row of a data file; a folder yields the rows of its data files in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        if not files:
            raise InstillError(f"{path}: folder holds no {', '.join(SUFFIXES)} files")
        for f in files:
            yield from read_rows(f, skipped)
        return
    if not path.is_file():
        raise InstillError(f"{path}: data file not found")
    if path.suffix == ".parquet":  # binary: never decoded as text
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise InstillError(f"{path}: not a readable Parquet file ({exc})") from None
        if table.num_rows == 0:
            raise InstillError(f"{path}: file is empty")
        for i, row in enumerate(table.to_pylist(), 1):
            yield RawRow(row, str(path), i)
        return
    text = _text(path)
    name = str(path)
    if path.suffix == ".jsonl":
        for n, line in jsonl.lines(text):  # (split on "\n" only: the T0 mix holds U+2028)
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise InstillError(
                        f"{name}:{n}: each line must be a JSON object, got {type(row).__name__}"
                    )
            except json.JSONDecodeError as exc:
                reason = f"{name}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"
                if skipped is None:
                    raise InstillError(reason) from None
                skipped.append({"where": f"{name}:{n}", "reason": reason})
                continue
            except InstillError as exc:
                if skipped is None:
                    raise
                skipped.append({"where": f"{name}:{n}", "reason": str(exc)})
                continue
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
