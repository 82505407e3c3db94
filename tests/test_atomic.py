"""Replacing and writing outputs: a failed replacement keeps the old directory, dangerous
--overwrite targets are refused, killed writes' leftovers are cleaned, and a full disk or a
read-only place is one clear error naming the path (CLI exit 2), the last complete checkpoint
untouched."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from instill.atomic import COMPLETE, atomic_directory
from instill.config import AdapterConfig, BuiltinDataConfig, DataConfig, TrainConfig
from instill.data.dataset import build_data
from instill.errors import InstillError
from instill.models import attach_adapter
from instill.train import train
from instill.train.checkpoint import complete_checkpoints, prune, save_model_dir
from tests.test_cli import run as run_cli

FULL = "No space left on device (free some space or choose another train.output_dir)"


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def fill(target: Path, text: str) -> None:
    with atomic_directory(target, "checkpoint", "train.output_dir") as tmp:
        (tmp / "weights.bin").write_text(text)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def rows(builtin_data):
    return builtin_data(2).train


# --- replacement ---------------------------------------------------------------------------------


def test_a_failed_rename_in_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "best"
    fill(target, "old")
    before = snapshot(target)
    real = os.replace

    def refuse_new(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".best.tmp-"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(InstillError) as info:
        fill(target, "new")
    assert str(info.value) == (
        f"{target}: cannot write checkpoint: Permission denied "
        "(make it writable or choose another train.output_dir)"
    )
    assert snapshot(target) == before
    assert hidden(tmp_path) == []


def test_a_kill_while_the_old_copy_is_deleted_leaves_the_new_one_in_place(tmp_path):
    """The old directory is deleted only after the new one is in: a kill during that deletion
    leaves the new one complete, and a hidden leftover that the next write removes."""
    target = tmp_path / "final"
    script = textwrap.dedent(f"""
        import os, shutil, signal
        from pathlib import Path
        from instill.atomic import atomic_directory
        target = Path({str(target)!r})
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_text("old")
        shutil.rmtree = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_text("new")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (target / "weights.bin").read_text() == "new" and (target / COMPLETE).is_file()
    [left] = hidden(tmp_path)
    assert left.startswith(".final.old-")
    fill(target, "newer")
    assert hidden(tmp_path) == []
    assert (target / "weights.bin").read_text() == "newer"


def test_a_kill_between_the_two_renames_recovers_the_complete_new_copy(tmp_path):
    """Replacing renames the old directory aside, then the new one in: a kill between the two
    leaves both hidden and nothing under the name. The new copy has its .complete marker
    (written after its files were synced), so the next write of the target puts it back under
    its name before anything else, and deletes the old one: even a write that then fails
    leaves the new copy in place."""
    target = tmp_path / "final"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from instill.atomic import atomic_directory
        target = Path({str(target)!r})
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_text("old")
        real = os.replace
        def killed(src, dst, *args, **kwargs):
            if Path(src).name.startswith(".final.tmp-"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)
        os.replace = killed
        with atomic_directory(target) as tmp:
            (tmp / "weights.bin").write_text("new")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not target.exists()
    assert [name.split("-")[0] for name in hidden(tmp_path)] == [".final.old", ".final.tmp"]
    with pytest.raises(RuntimeError, match="stopped"), atomic_directory(target):
        raise RuntimeError("stopped")
    assert snapshot(target) == {".complete": b"ok\n", "weights.bin": b"new"}
    assert hidden(tmp_path) == []


def test_a_killed_write_that_had_not_finished_is_never_recovered(tmp_path):
    """Only a copy with its marker is recovered: a killed write's folder without one (cut short
    while its files were written) is deleted, whether or not an old copy was renamed aside."""
    dead = dead_pid()
    target = tmp_path / "final"
    part = tmp_path / f".final.tmp-{dead}-abcd1234"
    part.mkdir()
    (part / "weights.bin").write_text("half")
    old = tmp_path / f".final.old-{dead}-0f0f0f0f"
    old.mkdir()
    (old / "weights.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("stopped")
    assert not target.exists() and hidden(tmp_path) == []


def test_the_folder_is_synced_after_each_rename(tmp_path, monkeypatch):
    """A rename is durable only once its directory is synced (POSIX): the parent folder is
    fsynced right after a file or a directory is renamed into place."""
    from instill.atomic import write_text

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        events.append(("replace", Path(dst).name))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    folder = tmp_path.stat().st_ino
    write_text(tmp_path / "run.json", "{}\n")
    assert events[-2:] == [("replace", "run.json"), ("fsync", folder)]
    for content in ("first", "second"):  # a new name, then a replacement
        events.clear()
        fill(tmp_path / "final", content)
        assert events[-2:] == [("replace", "final"), ("fsync", folder)]
        marker = (tmp_path / "final" / COMPLETE).stat().st_ino
        weights = (tmp_path / "final" / "weights.bin").stat().st_ino
        synced = [ino for kind, ino in events if kind == "fsync"]
        assert synced.index(weights) < synced.index(marker)  # the files before their marker


def test_leftovers_of_killed_writes_are_removed_when_the_next_write_begins(tmp_path):
    dead, me = dead_pid(), os.getpid()
    stale = [
        f".step-1.tmp-{dead}-abcd1234",  # a killed write
        f".step-1.old-{dead}-0f0f0f0f",  # a killed replacement's old copy
        f".step-1.tmp-{me}-ab12cd34",  # this PID, but from before this process began (reused)
    ]
    kept = [
        ".step-1.tmp-1-abcd1234",  # PID 1 is running: it may still be writing
        f".step-1.tmp-{me}-fresh123",  # this process's own, made after it began
        f".step-10.tmp-{dead}-abcd1234",  # another target's
        ".step-1.tmp-notes",  # not a name instill makes
        f".step-1.tmp-{dead}",  # nor this
    ]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_text("x")
    (tmp_path / f"step-1.tmp-{dead}-abcd1234").write_text("not hidden")
    day_ago = os.path.getmtime(tmp_path) - 86400
    os.utime(tmp_path / stale[2], (day_ago, day_ago))
    fill(tmp_path / "step-1", "x")
    assert hidden(tmp_path) == sorted(kept)
    assert (tmp_path / f"step-1.tmp-{dead}-abcd1234").is_file()
    assert (tmp_path / "step-1" / COMPLETE).is_file()


def test_a_pruned_checkpoint_is_renamed_aside_before_it_is_deleted(tmp_path, monkeypatch):
    """A kill while an old checkpoint is deleted must not leave a half-deleted step-N that still
    looks complete: it leaves the step's name first."""
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        fill(folder / f"step-{step}", str(step))
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # killed: never deleted
    prune(folder, keep=2)
    assert [p.name for p in complete_checkpoints(folder)] == ["step-2", "step-3"]
    [left] = hidden(folder)
    assert left.startswith(".step-1.old-")


def test_a_root_the_home_or_the_working_directory_is_never_replaced(tmp_path, monkeypatch):
    from instill.atomic import refuse_to_replace

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    home, work = home.resolve(), work.resolve()
    fix = "refusing to replace it: choose another --output"
    expected = {
        Path("/"): f"/ is a filesystem root; {fix}",
        Path("."): f". is the current directory ({work}); {fix}",
        home: f"{home} is your home directory ({home}); {fix}",
        Path(".."): f".. holds the current directory ({work}); {fix}",
    }
    for path, message in expected.items():
        with pytest.raises(InstillError) as info:
            refuse_to_replace(path, "--output")
        assert str(info.value) == message
    run = tmp_path / "elsewhere" / "run"
    for path, said in [(run, "is"), (run.parent, "holds")]:
        with pytest.raises(InstillError) as info:
            refuse_to_replace(path, "--output", keep={"the run directory": run})
        assert str(info.value) == f"{path} {said} the run directory ({run.resolve()}); {fix}"
    refuse_to_replace(tmp_path / "elsewhere", "--output")  # anything else may be replaced
    with pytest.raises(InstillError, match="is the current directory"):
        fill(Path("."), "x")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


@pytest.fixture
def export_run_dir(tmp_path, tokenizer):
    from tests.test_export import _fake_run

    return _fake_run(tmp_path, tokenizer)


@pytest.mark.parametrize("where", ["cwd", "run", "above run", "final"])
def test_export_overwrite_of_the_working_or_run_directory_is_refused(
    export_run_dir, tmp_path, capsys, monkeypatch, where
):
    run = export_run_dir
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    output, said = {
        "cwd": (".", f". is the current directory ({work.resolve()})"),
        "run": (str(run), f"{run} is the run directory ({run.resolve()})"),
        "above run": (str(tmp_path), f"{tmp_path} holds the run directory ({run.resolve()})"),
        "final": (
            str(run / "final"),
            f"{run / 'final'} is the run's tuned model ({(run / 'final').resolve()})",
        ),
    }[where]
    code, _, err = run_cli(
        ["export", str(run), "--format", "gguf", "--quant", "f32", "--output", output,
         "--overwrite"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2
    assert last_line(err) == f"error: {said}; refusing to replace it: choose another --output"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("nested", [False, True])
def test_train_overwrite_of_the_working_directory_is_refused(tmp_path, capsys, monkeypatch, nested):
    run = tmp_path / "quickstart"
    work = run / "sub" if nested else run
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    output_dir = tmp_path if nested else Path("..")
    code, _, err = run_cli(
        ["train", "quickstart", "--overwrite", f"train.output_dir={output_dir}",
         f"model.name={tmp_path / 'no-such-model'}"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2
    said = "holds" if nested else "is"
    assert last_line(err) == (
        f"error: {output_dir / 'quickstart'} {said} the current directory ({work.resolve()}); "
        "refusing to replace it: choose another train.output_dir or name"
    )
    assert (work / "notes.txt").read_text() == "mine"


# --- failed writes -------------------------------------------------------------------------------

TRAIN = [
    "eval.before=false",
    "eval.after=false",
    "eval.suites=[builtin]",
    "eval.holdout_clusters=[]",
    "data.replay=null",
    "data.builtin.train_per_family=4",
    "data.builtin.families=[addition,uppercase]",
    "train.batch_size=2",
    "train.max_steps=3",
    "train.save_every=1",
]


@pytest.mark.parametrize("which", ["checkpoint", "final"])
def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(
    tiny_dir, tmp_path, capsys, monkeypatch, which
):
    """`instill train` on a disk that fills up: exit 2, one line naming the folder, and the
    checkpoints written before it byte for byte as they were."""
    from transformers import PreTrainedTokenizerBase

    folder = tmp_path / "quickstart" / "checkpoints"
    kept: dict[str, dict[str, bytes]] = {}
    real = PreTrainedTokenizerBase.save_pretrained

    def save(self, path, *args, **kwargs):
        full = (folder / "step-1" / COMPLETE).is_file() if which == "checkpoint" else (
            Path(path).name.startswith(".final.tmp-")
        )  # fmt: skip
        if full:  # the disk fills up here
            kept.update({p.name: snapshot(p) for p in complete_checkpoints(folder)})
            no_space()
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save)
    code, _, err = run_cli(
        ["train", "quickstart", f"model.name={tiny_dir}", f"train.output_dir={tmp_path}", *TRAIN],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code == 2
    failed, what = {
        "checkpoint": (folder / "step-2", "checkpoint"),
        "final": (tmp_path / "quickstart" / "final", "final model"),
    }[which]
    assert last_line(err) == f"error: {failed}: cannot write {what}: {FULL}"
    assert list(kept) == (["step-1"] if which == "checkpoint" else ["step-1", "step-2"])
    assert {p.name: snapshot(p) for p in complete_checkpoints(folder)} == kept
    assert hidden(folder) == [] and hidden(tmp_path / "quickstart") == []


@pytest.mark.parametrize("where", ["metrics", "tensorboard", "best"])
def test_training_log_and_best_write_failures_name_the_file(
    tiny, tokenizer, rows, tmp_path, monkeypatch, where
):
    import builtins

    from torch.utils.tensorboard import SummaryWriter

    if where == "metrics":
        real_open = builtins.open

        def read_only(file, *args, **kwargs):
            if str(file).endswith("metrics.jsonl"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", read_only)
        path, what = tmp_path / "metrics.jsonl", "metrics"
        reason = "Read-only file system (make it writable or choose another train.output_dir)"
    elif where == "tensorboard":
        monkeypatch.setattr(SummaryWriter, "add_scalar", no_space)
        path, what, reason = tmp_path / "tensorboard", "TensorBoard logs", FULL
    else:
        monkeypatch.setattr(tokenizer, "save_pretrained", no_space)
        path, what, reason = tmp_path / "checkpoints" / "best", "best checkpoint", FULL
    model, _ = attach_adapter(tiny, AdapterConfig(r=4))
    cfg = TrainConfig(max_steps=2, batch_size=2, log_every=1, eval_every=1)
    with pytest.raises(InstillError) as info:
        train(model, tokenizer, rows, cfg, tmp_path, validation=rows[:2])
    assert str(info.value) == f"{path}: cannot write {what}: {reason}"


def test_a_full_disk_during_an_export_keeps_the_previous_export(
    export_run_dir, tmp_path, monkeypatch
):
    from instill.export import export_run, gguf_file

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.gguf").write_text("previous")
    monkeypatch.setattr(gguf_file, "write_gguf", no_space)
    with pytest.raises(InstillError) as info:
        export_run(export_run_dir, fmt="gguf", quant="f32", output=out, overwrite=True)
    assert str(info.value) == (
        f"{out}: cannot write export: No space left on device "
        "(free some space or choose another --output)"
    )
    assert snapshot(out) == {"model.gguf": b"previous"}
    assert hidden(tmp_path) == []


def test_a_model_cache_that_cannot_be_written_is_a_clear_error(
    tiny, tokenizer, tmp_path, monkeypatch
):
    from transformers import LlamaForCausalLM

    from instill.export.gguf_file import write_gguf
    from instill.models.resolve import resolve_model, sha256_file

    gguf = tmp_path / "tiny.gguf"
    write_gguf(tiny, tokenizer, gguf, "f32", name="tiny", base_gguf=None)
    monkeypatch.setenv("INSTILL_HOME", str(tmp_path / "home"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", read_only)
    with pytest.raises(InstillError) as info:
        resolve_model(str(gguf))
    target = tmp_path / "home" / "models" / f"tiny-{sha256_file(gguf)[:12]}"
    assert str(info.value) == (
        f"{target}: cannot write model cache: Read-only file system "
        "(make it writable or choose another INSTILL_HOME)"
    )
    assert list(target.parent.iterdir()) == []


def test_caches_that_cannot_be_written_are_skipped_with_a_warning(
    tiny, tokenizer, tmp_path, monkeypatch, capsys
):
    """The data cache and the base-reply cache only save time: the run goes on without them,
    and says which file could not be written and why."""
    import numpy as np

    from instill import anchors
    from instill.data.cache import cache_key
    from instill.data.examples import EvalExample

    home = tmp_path / "home"
    monkeypatch.setenv("INSTILL_HOME", str(home))
    monkeypatch.setattr(np, "savez", no_space)
    cfg = DataConfig(builtin=BuiltinDataConfig(train_per_family=2, families=["addition"]))
    data = build_data(tokenizer, cfg)
    assert data.train and not data.from_cache
    npz = home / "data-cache" / f"{cache_key(cfg, tokenizer)}.npz"
    err = capsys.readouterr().err
    assert f"{npz}: cannot write data cache: No space left on device" in err
    assert list((home / "data-cache").iterdir()) == []

    monkeypatch.setattr(anchors, "write_jsonl", no_space, raising=False)
    prompt = EvalExample("p1", ({"role": "user", "content": "Say hi."},), "", "open", "open")
    anchors.base_replies(tiny, tokenizer, [prompt], 2, batch_size=1)
    path = anchors._cache_file(anchors.model_digest(tiny), tokenizer, 2)
    err = capsys.readouterr().err
    assert f"{path}: cannot write base-reply cache: No space left on device" in err
    assert list(path.parent.iterdir()) == []


def test_a_report_that_cannot_be_written_names_the_run(tmp_path, monkeypatch):
    from instill.report import write_run_report

    fixture = Path(__file__).parent / "fixtures" / "run"
    run = Path(shutil.copytree(fixture, tmp_path / "run"))
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "report.md":
            no_space()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(InstillError) as info:
        write_run_report(run)
    assert (
        str(info.value) == f"{run}: cannot write report: No space left on device (free some space)"
    )


def test_a_transfer_report_that_cannot_be_written_names_its_folder(tmp_path, monkeypatch):
    from instill.report.experiment_report import write_transfer_report

    fixture = Path(__file__).parent / "fixtures" / "run"
    folder = tmp_path / "quickstart-transfer"
    for start in ("pretrained", "scratch"):
        shutil.copytree(fixture, folder / start)
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "report.md":
            no_space()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(InstillError) as info:
        write_transfer_report(folder)
    assert str(info.value) == (
        f"{folder}: cannot write transfer report: No space left on device (free some space)"
    )


@pytest.mark.parametrize("why", ["full", "folder"])
def test_chat_save_to_a_full_disk_or_a_folder_says_so_and_keeps_the_chat(
    tmp_path, monkeypatch, capsys, why
):
    """/save that cannot write is one line, and the chat goes on with its history, so it can be
    saved elsewhere; the file it was saved to before is kept whole."""
    from instill.chat import ChatSession

    chat = ChatSession(None, None, system="Be brief.")
    chat.history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = tmp_path / "chat.json"
    assert chat.command(f"/save {path}")
    before = path.read_bytes()
    assert json.loads(before)[1:] == chat.history
    chat.history.append({"role": "user", "content": "More"})
    if why == "full":
        real = Path.write_text

        def full(self, *args, **kwargs):
            if self.name == "chat.json" or self.name.startswith(".chat.json.tmp-"):
                no_space()
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", full)
        said = f"error: {path}: cannot write the chat: No space left on device (free some space)"
        where = path
    else:
        where = tmp_path / "folder"
        where.mkdir()
        said = f"error: {where}: cannot save the chat: Is a directory"
    capsys.readouterr()
    assert chat.command(f"/save {where}") is True  # the chat goes on
    err = capsys.readouterr().err
    assert last_line(err) == said + "; the chat is kept: /save it elsewhere"
    assert len(chat.history) == 3
    assert path.read_bytes() == before and hidden(tmp_path) == []


# --- real full and read-only filesystems ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: a real filesystem to fill or make read-only. Needs root with the right to
    mount (CAP_SYS_ADMIN); skipped elsewhere."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _read_only(folder: Path, request) -> tuple[Path, int]:
    """`folder` (holding step-1) made read-only for real: chmod 0o555 for a normal user; for
    root, whom permissions do not stop, a filesystem remounted read-only."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        return folder, errno.EACCES
    disk = folder.parent
    proc = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
    return folder, errno.EROFS


def _disk_for(request, tmp_path) -> Path:
    if os.geteuid() != 0:
        return tmp_path
    return request.getfixturevalue("small_disk")


def test_a_read_only_checkpoint_folder_is_a_clear_error(tiny, tokenizer, tmp_path, request):
    folder = _disk_for(request, tmp_path) / "checkpoints"
    save_model_dir(tiny, tokenizer, folder / "step-1", what="checkpoint")
    before = snapshot(folder / "step-1")
    folder, code = _read_only(folder, request)
    with pytest.raises(InstillError) as info:
        save_model_dir(tiny, tokenizer, folder / "step-2", what="checkpoint")
    assert str(info.value) == (
        f"{folder / 'step-2'}: cannot write checkpoint: {os.strerror(code)} "
        "(make it writable or choose another train.output_dir)"
    )
    assert snapshot(folder / "step-1") == before
    assert [p.name for p in folder.iterdir()] == ["step-1"]


class _NoFiles:
    def save_pretrained(self, path, **kwargs):
        pass


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_really_full_disk_names_the_checkpoint(tiny, tokenizer, small_disk, writer):
    """Libraries wrap the OSError of a full disk: safetensors in a SafetensorError, torch.save in
    a RuntimeError. Both are still one clear error."""
    folder = small_disk / "checkpoints"
    save_model_dir(tiny, tokenizer, folder / "step-1", what="checkpoint")
    before = snapshot(folder / "step-1")
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
    os.truncate(filler, filler.stat().st_size - (256 << 10))  # room for the small files only
    if writer == "safetensors":  # config.json fits, the 12 MiB of weights do not
        model, tok, extra = tiny, _NoFiles(), None
    else:  # 4 MiB of trainer state
        model, tok, extra = _NoFiles(), _NoFiles(), {"trainer_state.pt": torch.zeros(1 << 20)}
    with pytest.raises(InstillError) as info:
        save_model_dir(model, tok, folder / "step-2", extra=extra, what="checkpoint")
    assert str(info.value) == f"{folder / 'step-2'}: cannot write checkpoint: {FULL}"
    wrapped = {"safetensors": "SafetensorError", "torch.save": "RuntimeError"}[writer]
    assert type(info.value.__context__).__name__ == wrapped  # not a plain OSError
    assert snapshot(folder / "step-1") == before
    assert [p.name for p in folder.iterdir()] == ["step-1"]


def _fill(disk: Path) -> None:
    """Fill `disk` to the last byte (unbuffered writes of shrinking size)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (2**20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_generate_output_and_run_files_on_a_full_disk(tiny, tokenizer, small_disk, tmp_path):
    """`instill generate` on a full disk: one error naming --output, and the rows written before
    it was full are kept whole. A JSON record file (write_jsonl, used for eval records) and a
    run's text files (write_text) name themselves the same way and leave no temporary file."""
    from instill.atomic import write_text
    from instill.infer.batch import generate_file
    from instill.infer.generate import GenParams
    from instill.jsonl import read_jsonl, write_jsonl

    src = tmp_path / "in.jsonl"
    src.write_text("".join(f'{{"prompt": "Say {i}."}}\n' for i in range(4)))
    out = small_disk / "out.jsonl"
    assert generate_file(tiny, tokenizer, src, out, GenParams(max_new_tokens=2), 2) == (4, 0)
    before = out.read_bytes()
    (small_disk / "old.jsonl").write_text('{"a": 1}\n')
    _fill(small_disk)
    more = tmp_path / "more.jsonl"
    more.write_text(
        src.read_text() + "".join(f'{{"prompt": "{"x" * 200} {i}"}}\n' for i in range(40))
    )
    with pytest.raises(InstillError) as info:
        generate_file(tiny, tokenizer, more, out, GenParams(max_new_tokens=2), 2)
    assert str(info.value) == (
        f"{out}: cannot write generated rows: No space left on device "
        "(free some space or choose another --output)"
    )
    assert out.read_bytes().startswith(before) and len(read_jsonl(out, torn_tail=True)) >= 4
    with pytest.raises(InstillError, match=r"old\.jsonl: cannot write eval records: No space"):
        write_jsonl(small_disk / "old.jsonl", [{"a": 2}] * 10000, "eval records")
    assert read_jsonl(small_disk / "old.jsonl") == [{"a": 1}]  # the old file, whole
    with pytest.raises(InstillError, match=r"run\.json: cannot write the run record: No space"):
        write_text(small_disk / "run.json", "x" * 2**20, "the run record")
    assert not (small_disk / "run.json").exists()
    assert hidden(small_disk) == []


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """mkstemp/mkdtemp make private (0600/0700) files; what an atomic write leaves in place has
    the modes a plain open()/mkdir() gives under the process's umask."""
    from instill.atomic import atomic_directory, write_text

    write_text(tmp_path / "run.json", "{}\n")
    with atomic_directory(tmp_path / "final") as d:
        (d / "weights").write_text("w")
    (tmp_path / "plain.json").write_text("{}\n")
    (tmp_path / "plain").mkdir()
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "run.json") == mode(tmp_path / "plain.json") != 0o600
    assert mode(tmp_path / "final") == mode(tmp_path / "plain") != 0o700
