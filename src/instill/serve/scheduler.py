"""Dynamic batching: requests waiting when the decode thread is free are generated together
(left-padded, one `model.generate` call), each streaming its own tokens, each cancellable."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from instill.infer.generate import GenParams, _cut, _generation_config


@dataclass
class Job:
    prompt: list[int]
    params: GenParams
    on_text: Callable[[str], None] = lambda text: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    error: str | None = None
    _sent: int = 0
    _ended: bool = False


class _Rows:
    """Streamer + stopping criterion for one batch: routes each step's tokens to their jobs."""

    def __init__(self, jobs: list[Job], tokenizer, eot: set[int]):
        self.jobs, self.tokenizer, self.eot = jobs, tokenizer, eot
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the first call carries the prompts
            self.first = False
            return
        for job, tid in zip(self.jobs, value.reshape(-1).tolist(), strict=True):
            if job._ended:
                continue
            if tid in self.eot:
                job._ended, job.finish_reason = True, "stop"
                continue
            job.ids.append(tid)
            text = self.tokenizer.decode(job.ids, skip_special_tokens=True)
            cut, stopped = _cut(text, job.params.stop)
            if stopped:
                job._ended, job.finish_reason, text = True, "stop", cut
            elif text.endswith("\ufffd"):
                continue
            if len(text) > job._sent:
                job.on_text(text[job._sent :])
                job._sent = len(text)
            job.text = text

    def end(self) -> None:
        pass


class _StopFinished(StoppingCriteria):
    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        done = [j._ended or j.cancelled.is_set() for j in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Scheduler:
    """One decode thread. Jobs with the same generation parameters that are waiting together
    form one batch of up to `max_batch`."""

    def __init__(self, model, tokenizer, eot: list[int], max_batch: int = 8):
        self.model, self.tokenizer, self.eot = model, tokenizer, eot
        self.max_batch = max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="instill-decode")
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.queue.put(job)
        return job

    def close(self) -> None:
        self.queue.put(None)

    def _take(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch, rest = [first], []
        while len(batch) < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                rest.append(None)
                break
            (batch if job.params == first.params else rest).append(job)
        for job in rest:
            self.queue.put(job)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [j for j in batch if not j.cancelled.is_set()]
            try:
                if live:
                    self._run(live)
            except Exception as exc:  # one bad batch must not stop the server
                for job in live:
                    job.error = f"generation failed: {exc}"
            for job in batch:
                job.done.set()

    @torch.inference_mode()
    def _run(self, jobs: list[Job]) -> None:
        params = jobs[0].params
        device = next(self.model.parameters()).device
        width = max(len(j.prompt) for j in jobs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            attn[row, width - len(job.prompt) :] = 1
        if params.seed is not None:
            torch.manual_seed(params.seed)
        rows = _Rows(jobs, self.tokenizer, set(self.eot))
        self.model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            generation_config=_generation_config(self.model, self.tokenizer, params, self.eot),
            streamer=rows,
            stopping_criteria=StoppingCriteriaList([_StopFinished(jobs)]),
        )
