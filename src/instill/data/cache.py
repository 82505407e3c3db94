"""Cache of tokenised data, keyed by a hash of the data, the tokenizer and the data config.

A second run with the same inputs loads rows instead of rendering them again; a change in any
input (a file's bytes, the tokenizer or its chat template, a data option, or instill's own data
code) gives a new key. Stored as .npz without pickles, written aside and renamed. A cache that
cannot be written (full disk, read-only $INSTILL_HOME) is skipped with a warning naming the file:
it only saves time, so the run goes on without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from instill.atomic import WriteError, atomic_file
from instill.config import DataConfig
from instill.data.sources import SUFFIXES

_CODE = ("builtin.py", "constraints.py", "formats.py", "render.py", "sources.py", "dataset.py")


def _hash_path(h, path: Path) -> bool:
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return True


def cache_key(cfg: DataConfig, tokenizer, holdout=frozenset()) -> str | None:
    """None when an input cannot be hashed cheaply (a hub dataset): no caching then."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE:
        h.update((here / name).read_bytes())
    h.update(cfg.model_dump_json(exclude={"replay"}).encode())  # replay rows are added after
    h.update(repr(sorted(holdout)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    )
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    h.update(json.dumps([tokenizer.chat_template, special]).encode())
    paths = [s.path for s in cfg.sources]
    if isinstance(cfg.validation, str) and cfg.validation:
        paths.append(cfg.validation)
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            return None
        _hash_path(h, path)
    return h.hexdigest()[:24]


def _pack_rows(rows, prefix: str) -> dict[str, np.ndarray]:
    ids = [t for r in rows for t in r.input_ids]
    mask = [m for r in rows for m in r.mask]
    return {
        f"{prefix}_ids": np.asarray(ids, dtype=np.int64),
        f"{prefix}_mask": np.asarray(mask, dtype=np.int8),
        f"{prefix}_lens": np.asarray([len(r.input_ids) for r in rows], dtype=np.int64),
        f"{prefix}_sources": np.asarray([r.source for r in rows], dtype=str),
    }


def _unpack_rows(z, prefix: str, row_cls) -> list:
    ids, mask = z[f"{prefix}_ids"].tolist(), z[f"{prefix}_mask"].tolist()
    rows, at = [], 0
    for n, src in zip(z[f"{prefix}_lens"].tolist(), z[f"{prefix}_sources"].tolist(), strict=True):
        rows.append(row_cls(ids[at : at + n], mask[at : at + n], src))
        at += n
    return rows


def save(folder: Path, key: str, data) -> None:
    from rich.markup import escape

    from instill.console import console

    arrays = {**_pack_rows(data.train, "train"), **_pack_rows(data.validation, "val")}
    meta = {"stats": data.stats.as_dict(), "skipped": data.skipped}
    arrays["meta"] = np.asarray(json.dumps(meta))
    try:
        with atomic_file(folder / f"{key}.npz", "data cache", "INSTILL_HOME") as tmp:
            with open(tmp, "wb") as f:  # a file object: savez adds no .npz to the name
                np.savez(f, **arrays)
    except WriteError as exc:
        console.print(f"[yellow]data not cached[/yellow]: {escape(str(exc))}", soft_wrap=True)


def load(folder: Path, key: str, row_cls, stats_cls, data_cls):
    path = folder / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            train = _unpack_rows(z, "train", row_cls)
            val = _unpack_rows(z, "val", row_cls)
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is rebuilt
    return data_cls(train, val, stats_cls(**meta["stats"]), meta["skipped"], from_cache=True)
