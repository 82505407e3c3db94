"""The server's decode thread: requests queue up from any thread and join the engine's running
batch between decode steps (continuous batching: a new request starts within one step).

    submit(job) -> queue -> decode thread: drop finished and cancelled rows, admit waiting jobs
                   (up to max_batch rows), one decode step -> job.on_text, job.done

Generation itself is infer/engine.py's, shared with evaluation, `instill generate` and chat. One
request never fails another: a row whose own part fails (its sampler or seed, its stop strings,
its text callback) fails alone (Engine.isolate_rows); a prefill that fails is retried one prompt
at a time, so only the prompt that breaks it fails; a failing decode step, which every row
shares, fails the running rows; the thread goes on.
"""

from __future__ import annotations

import queue
import threading

import torch

from instill.infer.engine import Engine, Job

__all__ = ["DecodeThread", "Job", "Scheduler"]


class DecodeThread:
    """What the server talks to: submit(job) from any thread, close(). One daemon thread takes
    the jobs from a queue in `_loop` (a None in the queue: stop after the jobs before it)."""

    def _start(self, name: str) -> None:
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)
        self.thread.start()

    def _loop(self) -> None:
        raise NotImplementedError

    def submit(self, job: Job) -> Job:
        self.queue.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs submitted before this call (and rows already running), then stop."""
        self.queue.put(None)
        self.thread.join(timeout)


class Scheduler(Engine, DecodeThread):
    """One decode thread running a batch of up to `max_batch` rows, refilled every step."""

    isolate_rows = True

    def __init__(self, model, tokenizer, max_batch: int = 8):
        # rows unpadded: a lone request decodes at a single stream's speed (padding it to 4 rows
        # for batch invariance, as evaluation does, costs a CPU the work of those rows)
        super().__init__(model, tokenizer, max_batch, row_block=1)
        self._start("instill-decode")

    def _loop(self) -> None:
        closing = False
        while True:
            waiting: list[Job] = []
            if not self.rows:
                if closing or (job := self.queue.get()) is None:
                    return
                waiting.append(job)
            while not closing and len(self.rows) + len(waiting) < self.max_batch:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                closing = job is None
                if job is not None:
                    waiting.append(job)
            with torch.inference_mode():
                self._turn(waiting)

    def _turn(self, waiting: list[Job]) -> None:
        """Drop finished rows, admit the waiting jobs, one decode step."""
        try:
            self._drop()
            admitted = []
            for job in waiting:
                if job.cancelled.is_set():
                    job.done.set()
                else:
                    admitted.append(job)
            self.admit(admitted, on_error=self._failed_prefill)
            self._drop()
            if self.rows:
                self._step()
        except Exception as exc:  # one failed step fails its batch, never the thread
            for job in waiting:
                if not job.done.is_set():
                    job.error = f"generation failed: {exc}"
                    job.done.set()
            self.fail_all(f"generation failed: {exc}")

    def _failed_prefill(self, jobs: list[Job], exc: Exception) -> None:
        """A failed prefill fails the jobs prefilled together; the running rows go on."""
        for row in self.rows:
            if any(row.job is job for job in jobs):
                row.finished = self._ended = True
        for job in jobs:
            job.error = f"generation failed: {exc}"
            job.done.set()
