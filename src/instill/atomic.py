"""Writes that are complete or absent, and write errors that name the path.

    atomic_directory(target): fill the hidden sibling .NAME.tmp-PID-XXXXXXXX -> fsync its files
        -> .complete marker, fsynced -> the old target renamed aside to .NAME.old-PID-XXXXXXXX ->
        the new one renamed in (if that fails, the old one is renamed back) -> the folder
        fsynced (a rename is durable only then) -> the old one deleted
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

Recovery: a kill between the two renames of a replacement leaves the old copy and the new one
both hidden, and nothing under the target's name. The new copy is complete when it holds its
.complete marker: the marker is written only after every file in it was fsynced, and after it
nothing but the renames remains. So before leftovers are deleted, a target that is missing gets
back the newest complete .NAME.tmp-PID-X among them (also the one a first write left when killed
just before its only rename); the rest are deleted as above. A target that exists is kept as it
is (a kill before the first rename: the replacement never happened).
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


_LEFTOVER = re.compile(r"\.(.+)\.(tmp|old)-(\d+)-[a-z0-9_]+")


def leftover_of(name: str) -> str | None:
    """The target a hidden sibling named `name` was left by (.NAME.tmp-PID-X or
    .NAME.old-PID-X gives NAME), or None for any other name."""
    found = _LEFTOVER.fullmatch(name)
    return found.group(1) if found else None


def _leftover_pid(target: Path, name: str) -> int | None:
    found = _LEFTOVER.fullmatch(name)
    return int(found.group(3)) if found and found.group(1) == target.name else None


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
    were killed, once a missing target got back a complete new copy among them (the rules are
    in the module docstring); return what was deleted."""
    target = Path(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    stale = [Path(e.path) for e in entries if _stale(target, e)]
    _recover(target, stale)
    removed = []
    for path in stale:
        if os.path.lexists(path):
            _delete(path)
            removed.append(path)
    return removed


def _stale(target: Path, entry: os.DirEntry) -> bool:
    pid = _leftover_pid(target, entry.name)
    if pid is None:
        return False
    if pid == os.getpid():
        try:
            return entry.stat(follow_symlinks=False).st_mtime < _STARTED
        except OSError:
            return False
    return not _running(pid)


def _recover(target: Path, stale: list[Path]) -> None:
    """Rename the newest complete new copy among `stale` to `target` when `target` is missing:
    a replacement killed between its two renames had finished writing it."""
    if os.path.lexists(target):
        return
    complete = []
    for path in stale:
        if _LEFTOVER.fullmatch(path.name).group(2) != "tmp" or path.is_symlink():
            continue  # an old copy renamed aside, or not a folder instill made
        try:
            complete.append((os.stat(path / COMPLETE).st_mtime_ns, path))
        except OSError:  # no marker (cut short while its files were written), or a file
            continue
    if complete:
        os.rename(max(complete)[1], target)
        _fsync_dir(target.parent)


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
        _fsync_dir(target.parent)
        return
    old = target.parent / (_aside(target, "old") + secrets.token_hex(4))
    os.rename(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the names in a folder durable (POSIX: a rename or a new file reaches the disk only
    with its directory). Filesystems that cannot sync a directory say EINVAL: nothing to do."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):  # a folder after what it holds
        if p.is_symlink():
            continue
        if p.is_file():
            _fsync_file(p)
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(path)


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
            # the files reach the disk before the marker that says they are all there
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text("ok\n")
            _fsync_file(tmp / COMPLETE)
            _fsync_dir(tmp)
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
            _fsync_file(tmp)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        finally:
            tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str, what: str = "file", setting: str | None = None) -> None:
    """Write a whole text file through atomic_file: the old file or the new one, never half."""
    with atomic_file(target, what, setting) as tmp:
        tmp.write_text(text, encoding="utf-8")
