"""Writes that are complete or absent, and write errors that name the path.

    atomic_directory(target): fill the hidden sibling .NAME.tmp-PID-XXXXXXXX -> .complete marker
        -> fsync -> the old target renamed aside to .NAME.old-PID-XXXXXXXX -> the new one renamed
        in (if that fails, the old one is renamed back) -> the old one deleted
    atomic_file(target): the same for one file (a rename replaces a file in one step)
    remove_directory(path): renamed aside, then deleted: a half-deleted folder never keeps its name
    refuse_to_replace(path): never replace a filesystem root, the home directory, the working
        directory, a folder that holds one of them, or a folder the caller names
    writing(path, what, setting): a full disk, a read-only or forbidden place (ENOSPC, EDQUOT,
        EFBIG, EROFS, EACCES, EPERM, EIO, ENOTDIR) becomes a WriteError (an InstillError)
        "<path>: cannot write <what>: <reason> (<advice>)", shown by the CLI as one line

Leftovers: a write killed part way (even by SIGKILL) leaves at most hidden .NAME.tmp-PID-X and
.NAME.old-PID-X siblings, never a target that looks complete. When a new write (or removal) of the
same target begins, its leftovers are deleted if the process that made them (PID) is no longer
running, or is this process and they predate its start (the PID was reused). Nothing else is
touched: other names, other targets' leftovers, leftovers of a running process (it may still be
writing), and files that only look alike.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from instill.errors import InstillError

COMPLETE = ".complete"
_STARTED = time.time()  # when this process began writing (leftovers older than this are stale)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
WRITE_ERRORS = _NO_SPACE | _NOT_WRITABLE | {errno.EIO, errno.ENOTDIR}
_RUST_IO = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O error


class WriteError(InstillError):
    """A file or directory could not be written: full, read-only, forbidden."""

    def __init__(self, path: Path, what: str, code: int, setting: str | None):
        if code in _NO_SPACE:
            advice = "free some space"
        elif code in _NOT_WRITABLE:
            advice = "make it writable"
        else:
            advice = "check the disk"
        if setting:
            advice += f" or choose another {setting}"
        super().__init__(f"{path}: cannot write {what}: {os.strerror(code)} ({advice})")
        self.path, self.errno = Path(path), code


def write_errno(exc: BaseException) -> int | None:
    """The errno of a full, read-only or forbidden place behind `exc`, or None. Libraries wrap
    the OSError: torch.save raises a RuntimeError whose context is the OSError of the file
    object it wrote to, safetensors a SafetensorError that quotes "(os error 28)"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            return exc.errno
        found = _RUST_IO.search(str(exc))
        if found and int(found.group(1)) in WRITE_ERRORS:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def writing(path: Path, what: str, setting: str | None = None) -> Iterator[None]:
    """Turn a failed write inside the block into a WriteError naming `path` (what was being
    written, and the setting that chooses another place). Other errors pass unchanged."""
    try:
        yield
    except InstillError:
        raise
    except Exception as exc:
        code = write_errno(exc)
        if code is None:
            raise
        raise WriteError(path, what, code, setting) from None


def _protected(keep: dict[str, Path]) -> dict[str, Path]:
    places = dict(keep)
    try:
        places["the current directory"] = Path.cwd()
    except OSError:  # the working directory was deleted: nothing to protect there
        pass
    try:
        places["your home directory"] = Path.home()
    except (KeyError, RuntimeError):  # no HOME and no password entry
        pass
    return places


def refuse_to_replace(
    path: Path, setting: str | None = None, keep: dict[str, Path] | None = None
) -> None:
    """Raise unless `path` may be deleted and replaced: never a filesystem root, the home or
    working directory, a folder holding one of them, or one of `keep` ({description: path},
    e.g. the run an export reads) or a folder holding it."""
    full = Path(os.path.abspath(path)).resolve()
    fix = f": choose another {setting}" if setting else ""
    if full == Path(full.anchor):
        raise InstillError(f"{path} is a filesystem root; refusing to replace it{fix}")
    for label, place in _protected(keep or {}).items():
        place = Path(os.path.abspath(place)).resolve()
        if full == place:
            raise InstillError(f"{path} is {label} ({place}); refusing to replace it{fix}")
        if full in place.parents:
            raise InstillError(f"{path} holds {label} ({place}); refusing to replace it{fix}")


def _aside(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _leftover_pid(target: Path, name: str) -> int | None:
    found = re.fullmatch(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-[a-z0-9_]+", name)
    return int(found.group(1)) if found else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Delete the .NAME.tmp-PID-X and .NAME.old-PID-X siblings of `target` left by writes that
    were killed (the rule is in the module docstring); return what was deleted."""
    target = Path(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        pid = _leftover_pid(target, entry.name)
        if pid is None:
            continue
        if pid == os.getpid():
            try:
                stale = entry.stat(follow_symlinks=False).st_mtime < _STARTED
            except OSError:
                continue
        else:
            stale = not _running(pid)
        if stale:
            _delete(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is renamed aside first and deleted after,
    or renamed back when `new` cannot be renamed in."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    old = target.parent / (_aside(target, "old") + secrets.token_hex(4))
    os.rename(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _delete(old)


def remove_directory(path: Path) -> None:
    """Delete a directory: renamed aside to a hidden sibling first, so a kill part way through
    leaves a hidden leftover (removed by the next write or removal of the same path) instead
    of a half-deleted folder under its own name."""
    path = Path(path)
    remove_leftovers(path)
    old = path.parent / (_aside(path, "old") + secrets.token_hex(4))
    os.rename(path, old)
    _delete(old)


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


def _umask() -> int:
    """The process's umask (read once: setting it to read it is not thread-safe)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None
_umask()  # at import, before any thread starts


@contextmanager
def atomic_directory(
    target: Path, what: str = "directory", setting: str | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill. On success it gets a .complete marker, is
    fsynced and replaces `target`; on any error it is removed and `target` is left as it was.
    A crash (even SIGKILL) leaves at most hidden `.name.tmp-*` / `.name.old-*` folders, never a
    `target` that looks complete. A failed write raises WriteError naming `target`."""
    target = Path(target)
    refuse_to_replace(target, setting)
    with writing(target, what, setting):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=_aside(target, "tmp"), dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); a plain mkdir would not
        try:
            yield tmp
            (tmp / COMPLETE).write_text("ok\n")
            _fsync_tree(tmp)
            _swap_in(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: Path, what: str = "file", setting: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path of `target` to write; on success it is fsynced and renamed
    over `target`, on any error removed. A failed write raises WriteError naming `target`."""
    target = Path(target)
    with writing(target, what, setting):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        fd, name = tempfile.mkstemp(prefix=_aside(target, "tmp"), dir=target.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); open() would not
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str, what: str = "file", setting: str | None = None) -> None:
    """Write a whole text file through atomic_file: the old file or the new one, never half."""
    with atomic_file(target, what, setting) as tmp:
        tmp.write_text(text, encoding="utf-8")
