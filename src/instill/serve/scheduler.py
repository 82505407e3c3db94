"""Continuous (iteration-level) batching: one decode thread owns a running batch.

Between decode steps the thread drops finished and cancelled rows and admits waiting jobs (up to
`max_batch` rows), so a new request starts within one step instead of after a whole batch. The
jobs admitted at one step are prefilled together (left-padded) and their KV cache is merged into
the running one. Rows stay left-padded to a common length with a 2-D attention mask and explicit
position ids, so a padded row computes what it would alone. Each row keeps its own generation
parameters: greedy rows take the argmax; sampling rows apply repetition penalty, temperature,
top-k and top-p to their own logits and draw from their own generator, seeded from
`params.seed` when given (a seeded request is reproducible whatever shares its batch). Text is
detokenized incrementally and streamed through `Job.on_text`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from instill.infer.generate import GenParams, _cut


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


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string (not streamed yet)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class _Row:
    """One job in the running batch: its token choice and its incremental detokenization."""

    def __init__(self, job: Job, device: torch.device):
        self.job, p = job, job.params
        self.greedy = p.temperature == 0 and p.repetition_penalty == 1.0  # plain batch argmax
        self.procs = LogitsProcessorList()
        if p.repetition_penalty != 1.0:
            self.procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
        self.gen = None
        if p.temperature > 0:
            self.procs.append(TemperatureLogitsWarper(float(p.temperature)))
            if p.top_k:
                self.procs.append(TopKLogitsWarper(p.top_k))
            if p.top_p < 1.0:
                self.procs.append(TopPLogitsWarper(p.top_p))
            self.gen = torch.Generator(device=device)
            if p.seed is not None:
                self.gen.manual_seed(p.seed)
            else:
                self.gen.seed()
        self.start = self.read = 0  # ids[start:read] decode to the tail of `text` already made
        self.text = ""

    def choose(self, scores: torch.Tensor) -> int:
        """The next token from this row's logits, shape [1, vocab]."""
        penalty = self.job.params.repetition_penalty != 1.0  # the only one that reads the ids
        history = self.job.prompt + self.job.ids if penalty else []
        scores = self.procs(torch.tensor([history], device=scores.device), scores)
        if self.gen is None:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))


class Scheduler:
    """One decode thread running a batch of up to `max_batch` rows, refilled every step."""

    def __init__(self, model, tokenizer, eot: list[int], max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.eot = model, tokenizer, set(eot)
        self.max_batch = max_batch
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(eot)
        self.device = next(model.parameters()).device
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.attn: torch.Tensor | None = None  # [rows, width] 1 for real tokens, 0 for padding
        self.next: torch.Tensor | None = None  # [rows] the chosen tokens not yet in the cache
        self.thread = threading.Thread(target=self._loop, daemon=True, name="instill-decode")
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.queue.put(job)
        return job

    def close(self, timeout: float = 10.0) -> None:
        """Finish the running rows and the jobs submitted before this call, then stop."""
        self.queue.put(None)
        self.thread.join(timeout)

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
            admitted = []
            try:
                with torch.inference_mode():
                    self._drop()
                    admitted = [j for j in waiting if not self._finish_cancelled(j)]
                    if admitted:
                        self._admit(admitted)
                        self._drop()
                    if self.rows:
                        self._step()
            except Exception as exc:  # one failed step fails its batch, never the thread
                failed = {id(r.job): r.job for r in self.rows} | {id(j): j for j in admitted}
                for job in failed.values():
                    job.error = f"generation failed: {exc}"
                    job.done.set()
                self.rows, self.cache, self.attn, self.next = [], None, None, None

    @staticmethod
    def _finish_cancelled(job: Job) -> bool:
        if job.cancelled.is_set():
            job.done.set()
            return True
        return False

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        pos = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new prompts together and merge their cache into the running batch."""
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt) :] = torch.tensor(job.prompt)
            attn[i, width - len(job.prompt) :] = 1
        ids, attn, cache = ids.to(self.device), attn.to(self.device), DynamicCache()
        logits = self._forward(ids, attn, cache)
        rows = [_Row(j, self.device) for j in jobs]
        chosen = self._choose(rows, logits)
        if self.rows:  # left-pad the shorter side to a common width, then stack the rows
            old, new = self.attn.shape[1], width
            grow_old, grow_new = max(new - old, 0), max(old - new, 0)
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat(
                    [F.pad(mine.keys, (0, 0, grow_old, 0)), F.pad(theirs.keys, (0, 0, grow_new, 0))]
                )
                mine.values = torch.cat(
                    [
                        F.pad(mine.values, (0, 0, grow_old, 0)),
                        F.pad(theirs.values, (0, 0, grow_new, 0)),
                    ]
                )
            attn = torch.cat([F.pad(self.attn, (grow_old, 0)), F.pad(attn, (grow_new, 0))])
            chosen = torch.cat([self.next, chosen])
        else:
            self.cache = cache
        self.rows, self.attn, self.next = self.rows + rows, attn, chosen
        self._emit(rows, chosen[-len(rows) :].tolist())

    def _step(self) -> None:
        """One decode step for every running row."""
        self.attn = F.pad(self.attn, (0, 1), value=1)
        logits = self._forward(self.next[:, None], self.attn, self.cache)
        self.next = self._choose(self.rows, logits)
        self._emit(self.rows, self.next.tolist())

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        chosen = logits.argmax(-1)
        for i, row in enumerate(rows):
            if not row.greedy:
                chosen[i] = row.choose(logits[i : i + 1])
        return chosen

    def _drop(self) -> None:
        """Remove finished and cancelled rows; trim the columns that are padding in all rows."""
        keep = [
            i for i, r in enumerate(self.rows) if not (r.job._ended or r.job.cancelled.is_set())
        ]
        if len(keep) == len(self.rows):
            return
        for i, row in enumerate(self.rows):
            if i not in keep:
                row.job.done.set()
        if not keep:
            self.rows, self.cache, self.attn, self.next = [], None, None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        attn = self.attn.index_select(0, idx)
        first = int(attn.any(0).int().argmax())  # the first column that some row still uses
        self.attn, self.next = attn[:, first:], self.next.index_select(0, idx)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        for row, tid in zip(rows, tokens, strict=True):
            self._push(row, tid)

    def _push(self, row: _Row, tid: int) -> None:
        """Take one token for a row: stream the new text, end the job on a stop or the limit."""
        job, decode = row.job, self.tokenizer.decode
        if tid in self.eot:
            job.finish_reason = "stop"
            return self._end(row)
        job.ids.append(tid)
        prefix = decode(job.ids[row.start : row.read], skip_special_tokens=True)
        tail = decode(job.ids[row.start :], skip_special_tokens=True)
        if len(tail) > len(prefix) and not tail.endswith("\ufffd"):
            row.text += tail[len(prefix) :]
            row.start, row.read = row.read, len(job.ids)
            stops = job.params.stop
            if stops and _cut(row.text, stops)[1]:
                job.finish_reason = "stop"
                return self._end(row)
            ready = len(row.text) - _held_back(row.text, stops)
            if ready > job._sent:
                job.on_text(row.text[job._sent : ready])
                job._sent = ready
        if len(job.ids) >= job.params.max_new_tokens:
            self._end(row)

    def _end(self, row: _Row) -> None:
        """The job's final text is one decode of all its tokens (as `generate` makes it)."""
        job = row.job
        text, stopped = _cut(
            self.tokenizer.decode(job.ids, skip_special_tokens=True), job.params.stop
        )
        if stopped:
            job.finish_reason = "stop"
        if len(text) > job._sent and text.startswith(row.text[: job._sent]):
            job.on_text(text[job._sent :])
            job._sent = len(text)
        job.text, job._ended = text, True
        job.done.set()
