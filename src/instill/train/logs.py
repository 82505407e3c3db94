"""What training logs, on the main process: metrics.jsonl records and TensorBoard scalars.

    append_record(path, record)   one JSON line appended (opened, written, closed each time)
    TrainLogs(run_dir)            .record(dict) -> metrics.jsonl, .scalar(tag, value, step) ->
                                  <run>/tensorboard when the tensorboard package is installed

A write that fails for want of space or permission is a WriteError naming the file
(atomic.writing), shown by the CLI as one line; the checkpoints already written stay as they were.
"""

from __future__ import annotations

import threading
from pathlib import Path

from instill.atomic import write_errno, writing
from instill.jsonl import dumps

SETTING = "train.output_dir"


def append_record(path: Path, record: dict, what: str = "metrics") -> None:
    """Append one record to a JSONL log. The file is closed after each record, so a record that
    could not be written is not left in a buffer to fail again later."""
    with writing(path, what, SETTING), open(path, "a", encoding="utf-8") as f:
        f.write(dumps(record) + "\n")


class TrainLogs:
    def __init__(self, run_dir: Path):
        self.metrics = Path(run_dir) / "metrics.jsonl"
        self.board_dir = Path(run_dir) / "tensorboard"
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
        append_record(self.metrics, record)

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
