"""Checkpoints that are complete or absent: written to a temporary directory, fsynced, renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

COMPLETE = ".complete"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_dir(
    model: torch.nn.Module, tokenizer, target: Path, extra: dict | None = None
) -> None:
    """Save weights (or the adapter) + tokenizer + chat template to `target`, atomically.

    `extra` maps file names to tensors/objects saved with torch.save (optimizer state, RNG...).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def complete_checkpoints(folder: Path) -> list[Path]:
    """step-N directories that finished writing, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(folder: Path, keep: int) -> None:
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
