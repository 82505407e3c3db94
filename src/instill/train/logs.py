"""What a run logs, on the main process: metrics.jsonl records and TensorBoard scalars.

    Metrics(run_dir)              the one writer of <run>/metrics.jsonl: .append(record),
                                  .read() (a last line torn by a kill is dropped), .trim(step)
    TrainLogs(run_dir)            what the training loop logs, as a context manager:
                                  .record(dict) -> Metrics, .scalar(tag, value, step) ->
                                  <run>/tensorboard when the tensorboard package is installed;
                                  the TensorBoard writer is closed on every way out of the loop

A write that fails for want of space or permission is a WriteError naming the file
(atomic.writing), shown by the CLI as one line; the checkpoints already written stay as they were.
"""

from __future__ import annotations

import threading
from pathlib import Path

from instill.atomic import write_errno, writing
from instill.jsonl import dumps, read_jsonl, write_jsonl
from instill.rundir import RunDir

SETTING = "train.output_dir"


class Metrics:
    """<run>/metrics.jsonl: one JSON record per logged step, validation or score. Every record
    of a run (the base model's validation loss at step 0, the loop's records) and the trim on
    resume go through here."""

    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).metrics

    def append(self, record: dict) -> None:
        """Append one record. The file is opened and closed for each record, so a record that
        could not be written is not left in a buffer to fail again later, and no handle
        outlives the call."""
        with writing(self.path, "metrics", SETTING), open(self.path, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")

    def read(self) -> list[dict]:
        """Every record; a last line cut by the kill that stopped the run is dropped."""
        return read_jsonl(self.path, torn_tail=True) if self.path.is_file() else []

    def trim(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run logs those steps again), and a torn
        last line; the file is rewritten atomically."""
        if self.path.is_file():
            kept = [r for r in self.read() if r["step"] <= step]
            write_jsonl(self.path, kept, "metrics")


class TrainLogs:
    """The training loop's logs. `resume_step`: the run continues after that step, so records
    logged after it by the interrupted run are dropped first."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.metrics = Metrics(run_dir)
        if resume_step is not None:
            self.metrics.trim(resume_step)
        self.board_dir = RunDir(run_dir).tensorboard
        self.board = None
        self._hook = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        with writing(self.board_dir, "TensorBoard logs", SETTING):
            self.board = SummaryWriter(log_dir=str(self.board_dir))
        self._quiet_writer_thread()

    def record(self, record: dict) -> None:
        self.metrics.append(record)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.board is not None:
            with writing(self.board_dir, "TensorBoard logs", SETTING):
                self.board.add_scalar(tag, value, step)

    def close(self) -> None:
        board, self.board = self.board, None
        try:
            if board is not None:
                with writing(self.board_dir, "TensorBoard logs", SETTING):
                    board.close()
        finally:
            if self._hook is not None and threading.excepthook is self._hook:
                threading.excepthook = self._previous
            self._hook = None

    def __enter__(self) -> TrainLogs:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # already failing: the first error is the one to report
            self.close()
        except Exception:
            pass

    def _quiet_writer_thread(self) -> None:
        """TensorBoard writes from a thread of its own; when a write fails there, the thread's
        exception is raised again by the next add_scalar or close (which names the folder), but
        the thread also prints it as a traceback. Drop that print for write errors only."""
        self._previous = previous = threading.excepthook

        def hook(args) -> None:
            thread_module = type(args.thread).__module__ if args.thread is not None else ""
            if thread_module.startswith("tensorboard.") and write_errno(args.exc_value):
                return
            previous(args)

        self._hook = threading.excepthook = hook
