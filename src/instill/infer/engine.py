"""The one generation engine: continuous batching over a preallocated KV cache (cache.py).

    jobs -> admit, between steps, while rows are free: each prompt is prefilled alone,
            unpadded, into a free slot of the cache; its first token comes from that prefill
         -> step: one forward pass for every running row: [rows, 1] tokens at each row's own
            position, a [rows, 1, 1, width] mask over each row's own columns
         -> the next tokens (sampling.py), counted and checked on tensors: end of turn,
            max_new_tokens; rows followed live (streamed, stop strings, cancellable) also grow
            their text (text.py)
         -> finished rows leave; the last rows move down into their slots

Used by `infer.generate` (evaluation, `instill generate`, chat), which runs a list of jobs to
the end in the caller's thread, and by the server (serve/scheduler.py), whose decode thread
feeds it jobs as requests arrive.

A greedy reply is the same bits alone or in any batch (tests/test_engine.py): nothing a row
computes depends on the other rows, because every shape a row's arithmetic sees is its own.
- Prefill: a prompt is right-padded to a multiple of PREFILL_BLOCK tokens of its own, so a group
  prefilled together has one shape per row whatever the group.
- Decode: steps run a multiple of ROW_BLOCK rows (padding rows fill the rest): CPU matrix
  kernels give a row the same bits for every row count that is a multiple of 4, other bits for
  1-3 rows. Attention runs over a multiple of WIDTH_BLOCK columns: vectorised kernels (8 or 16
  lanes) give a row the same bits for every such width, the masked columns adding exact zeros.
- Sampling: each row draws from its own generator (sampling.py).
The server and chat run rows unpadded (row_block=1) so a single stream decodes at one row's
cost; its bits are then a one-row product's, and its tokens the batched ones unless the two
best candidates are within rounding of each other.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from instill.config import SamplingConfig, default
from instill.data.render import end_of_turn_ids
from instill.errors import InstillError
from instill.infer.cache import SlotCache
from instill.infer.sampling import Sampler
from instill.infer.text import TextStream, cut_at_stop

ROW_BLOCK = 4  # decode steps run a multiple of this many rows (see the module docstring)
WIDTH_BLOCK = 16  # ... over a multiple of this many cache columns
PREFILL_BLOCK = 8  # prompts are right-padded to a multiple of this many tokens
HEAD_MIN = 8  # a template head shorter than this is prefilled with each prompt


def _sampling(key: str):
    return default(SamplingConfig, key)  # the defaults of generate, chat and serve: one source


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = _sampling("max_new_tokens")
    temperature: float = _sampling("temperature")  # 0 means greedy
    top_p: float = _sampling("top_p")
    top_k: int = _sampling("top_k")  # 0 means no top-k
    repetition_penalty: float = _sampling("repetition_penalty")
    seed: int | None = _sampling("seed")
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Job:
    """One reply to make. `live` jobs are followed token by token: `ids` grows as the reply is
    made, `on_text` gets each new piece of text (stop strings held back), and `cancelled` is
    looked at every step. Others (batch generation) get `ids` and `text` when they end."""

    prompt: list[int]
    params: GenParams
    on_text: Callable[[str], None] | None = None
    live: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)  # generated tokens, without the end of turn
    text: str = ""
    finish_reason: str = "length"  # "stop": end of turn or stop string; "length"
    end_of_turn: int | None = None  # the end-of-turn token, when the model ended the turn
    error: str | None = None
    logprob: float | None = None  # with Engine(logprobs=True): the summed log-probability of
    # the generated tokens (end of turn included) under the model's own distribution, before
    # any sampling setting reshapes it (what a teacher-forced pass over them would give)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


class _Row:
    def __init__(self, job: Job, text: TextStream | None = None):
        self.job, self.text = job, text
        self.live = job.live or bool(job.params.stop) or job.on_text is not None
        self.finished = False


def _new_row(job: Job, tokenizer) -> _Row:
    wants_text = job.on_text is not None or bool(job.params.stop)
    return _Row(job, TextStream(tokenizer, job.params.stop, job.on_text) if wants_text else None)


class Engine:
    """Runs jobs on up to `max_batch` rows, refilled between decode steps.

    `isolate_rows`: a row whose own part fails (its sampler or seed, its text, its callback)
    ends with `job.error` while the other rows go on (the server: one request must never fail
    another); off, the error propagates to the caller (a batch run stops on it)."""

    isolate_rows = False

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        *,
        eot: Sequence[int] | None = None,
        capacity: int = 256,
        row_block: int = ROW_BLOCK,
        logprobs: bool = False,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        _check_layers(model)
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.row_block = row_block
        self.logprobs = logprobs  # sum each row's chosen tokens' log-probabilities (Job.logprob)
        self.eot = list(end_of_turn_ids(tokenizer) if eot is None else eot)
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eot)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots = _round_up(max_batch, row_block)  # and one more: the template's head
        self.head: list[int] | None = None  # computed at the first admission
        self.vocab = None  # known from the first logits
        self.rows: list[_Row] = []
        self._live: list[int] = []  # indices of the rows followed live
        self._ended = False  # some row finished since the last _drop
        self._on_done: Callable[[Job], None] | None = None
        self._eot = torch.tensor(self.eot, device=self.device)
        self._eot_set = set(self.eot)
        self._layers = _text_config(model).num_hidden_layers
        self._reset(_round_up(capacity, WIDTH_BLOCK), 64)

    # --- state -------------------------------------------------------------------------------

    def _reset(self, capacity: int, out_cap: int) -> None:
        """Empty rows and a fresh cache (after a failed step, or at the start)."""
        S, dev, long = self.slots, self.device, torch.long
        self.rows, self._live, self._ended = [], [], False
        self.cache = SlotCache(self._layers, S + 1, capacity, dev)
        self.head = None
        self.lens = self.cache.where.lens  # [S] tokens in each row's cache columns
        self.next = torch.full((S,), self.pad, dtype=long, device=dev)  # chosen, not yet fed
        self.count = torch.zeros(S, dtype=long, device=dev)  # generated tokens so far
        self.limit = torch.ones(S, dtype=long, device=dev)  # max_new_tokens
        self.out = torch.zeros(S, out_cap, dtype=long, device=dev)  # the generated tokens
        self.logprob = torch.zeros(S, dtype=torch.float64, device=dev)  # with logprobs=True
        self.columns = torch.arange(capacity, device=dev)
        self.sampler = Sampler(S, dev)

    def _make_room(self, prompt: int, new: int) -> None:
        need = _round_up(prompt + new + 1, WIDTH_BLOCK)
        if need > self.cache.capacity:
            capacity = max(need, _round_up(self.cache.capacity * 3 // 2, WIDTH_BLOCK))
            self.cache.grow(capacity)
            self.columns = torch.arange(capacity, device=self.device)
        if new > self.out.shape[1]:
            out = self.out.new_zeros(self.slots, max(new, self.out.shape[1] * 3 // 2))
            out[:, : self.out.shape[1]] = self.out
            self.out = out

    # --- running -----------------------------------------------------------------------------

    def run(
        self,
        jobs: Sequence[Job],
        on_done: Callable[[Job], None] | None = None,
        in_order: bool = False,
    ) -> None:
        """Run `jobs` to the end in this thread, admitting them as rows free up; `on_done` gets
        each job as it ends. Prompts of one padded length are prefilled together, and a
        prefill of a few prompts costs little more than one: so jobs are taken by prompt
        length (in the given order with `in_order`), a quarter of the rows at a time."""
        if jobs:  # one allocation for the whole list
            self._make_room(
                max(len(j.prompt) for j in jobs), max(j.params.max_new_tokens for j in jobs)
            )
        self._on_done = on_done
        pending = deque(jobs if in_order else sorted(jobs, key=lambda j: len(j.prompt)))
        least = max(1, self.max_batch // 4)
        with torch.inference_mode():
            while pending or self.rows:
                self._drop()
                free = self.max_batch - len(self.rows)
                if free >= min(least, len(pending)) or not self.rows:
                    self.admit([pending.popleft() for _ in range(min(free, len(pending)))])
                    self._drop()
                if self.rows:
                    self._step()

    def admit(self, jobs: Sequence[Job], on_error: Callable | None = None) -> None:
        """Prefill new prompts into the next free slots and take their first tokens. Prompts
        go in groups of the same padded length, each group one forward pass; a group that
        fails goes to `on_error(jobs, exc)` when given (the others are admitted)."""
        groups: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            try:
                if not job.prompt:
                    raise ValueError("cannot generate from an empty prompt")
                start = self._head_length(job.prompt)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error([job], exc)
                continue
            bucket = _round_up(len(job.prompt) - start, PREFILL_BLOCK)
            groups.setdefault((start, bucket), []).append(job)
        for (start, bucket), group in groups.items():
            if on_error is None:
                self._prefill(group, start, bucket)
                continue
            try:
                self._prefill(group, start, bucket)
            except Exception as exc:
                if len(group) > 1 and not any(r.job is j for r in self.rows for j in group):
                    # one prompt can break the group's forward pass (a token the model does
                    # not have): prefill each alone, so that only it fails; a row's prefill is
                    # the same alone or in a group
                    for job in group:
                        self.admit([job], on_error)
                else:
                    on_error(group, exc)

    def _head_length(self, prompt: list[int]) -> int:
        """How many of the prompt's first tokens are the chat template's fixed head (its
        default system turn, say), whose keys and values are computed once and copied."""
        if self.head is None:
            self.head = _template_head(self.tokenizer)
            if len(self.head) >= HEAD_MIN:
                try:
                    self._make_room(len(self.head), 0)
                    self._prefill([], 0, _round_up(len(self.head), PREFILL_BLOCK), head=True)
                except Exception:
                    self.head = None  # never a half-written head: the next admission retries
                    raise
        n = len(self.head)
        return n if n >= HEAD_MIN and len(prompt) > n and prompt[:n] == self.head else 0

    def _prefill(self, jobs: list[Job], start: int, bucket: int, head: bool = False) -> None:
        """One forward pass over the prompts' tokens after their first `start` (the head,
        copied in), each right-padded to `bucket` tokens: [rows, bucket] at positions
        start.. with a mask over the row's own columns. A row's prefill computes the same
        whatever else shares it: the padded length is its own, and every matrix product has a
        multiple of 4 rows."""
        first = self.slots if head else len(self.rows)
        prompts = [self.head] if head else [j.prompt for j in jobs]
        n = len(prompts)
        for job in jobs:
            self._make_room(len(job.prompt), job.params.max_new_tokens)
        if start:
            self.cache.copy_prefix(self.slots, first, n, start)
        dev = self.device
        ids = torch.full((n, bucket), self.pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p) - start] = torch.tensor(p[start:])
        ends = torch.tensor([len(p) for p in prompts], device=dev)
        query = start + torch.arange(bucket, device=dev)
        key = torch.arange(start + bucket, device=dev)
        visible = (key[None, None, :] <= query[None, :, None]) & (
            (key[None, None, :] < ends[:, None, None]) | (key == query[:, None])[None]
        )  # causal over the row's own tokens; a padding position sees itself too
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        last = sorted({len(p) - start - 1 for p in prompts})
        spare = (i for i in range(bucket) if i not in last)
        while len(last) * n % 4:  # the output projection too: a multiple of 4 rows
            last.append(next(spare))
        self.cache.where.prefill = (first, n, start)
        try:
            logits = self._forward(
                ids.to(dev),
                query[None].expand(n, -1),
                mask[:, None],
                torch.tensor(last, device=dev),
            )
        finally:
            self.cache.where.prefill = None
        if head:
            return
        at = torch.tensor([last.index(len(p) - start - 1) for p in prompts], device=dev)
        logits = logits[torch.arange(n, device=dev), at]
        if self.vocab is None:
            self.vocab = logits.shape[-1]
        for i, job in enumerate(jobs):
            row = self._setup(job, first + i)
            self.rows.append(row)
            if row.live:
                self._live.append(first + i)
        span = slice(first, first + n)
        self.lens[span] = ends
        self.count[span] = 0
        self.logprob[span] = 0
        self.limit[span] = torch.tensor([j.params.max_new_tokens for j in jobs], device=dev)
        self._take(self.sampler.choose(logits, first=first), first, logits)

    def _setup(self, job: Job, slot: int) -> _Row:
        """The row's sampler settings and text; when they fail (a seed its generator refuses, a
        stop string...), with isolate_rows, a failed row that leaves at the next _drop, its
        slot a plain greedy one until then (never the generator a moved row left behind)."""
        try:
            self.sampler.admit(slot, job.params, job.prompt, self.vocab)
            return _new_row(job, self.tokenizer)
        except Exception as exc:
            if not self.isolate_rows:
                raise
            self.sampler.admit(slot, GenParams(), job.prompt, self.vocab)
            row = _Row(job)
            row.live = False
            self._fail(row, exc)
            return row

    def _fail(self, row: _Row, exc: Exception) -> None:
        """This row alone ends with an error; the others go on."""
        row.finished = self._ended = True
        row.job.error = f"generation failed: {exc}"
        row.job.done.set()

    def _step(self) -> None:
        """One decode step for every running row."""
        n = len(self.rows)
        m = _round_up(n, self.row_block)
        where = self.cache.where
        where.rows = m
        where.width = _round_up(int(self.lens[:n].max()) + 1, WIDTH_BLOCK)
        lens = self.lens[:m]
        visible = self.columns[: where.width][None, :] <= lens[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        logits = self._forward(self.next[:m, None], lens[:, None], mask[:, None, None, :], 1)
        self.lens[:n] += 1
        self._take(self.sampler.choose(logits[:n]), 0, logits[:n])

    def _forward(self, ids, positions, mask, keep) -> torch.Tensor:
        """One model call on the cache: logits [rows, len(keep), vocab] (float32), or
        [rows, vocab] when `keep` is 1 (a decode step)."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        logits = out.logits.float()
        return logits[:, -1] if isinstance(keep, int) else logits

    def _take(self, tokens: torch.Tensor, first: int, logits: torch.Tensor) -> None:
        """The rows in slots first.. took `tokens` (chosen from `logits`): count them (and sum
        their log-probabilities), end rows at the end of turn or the limit, and grow the text
        of rows followed live."""
        n = tokens.shape[0]
        span = slice(first, first + n)
        if self.logprobs:
            chosen = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, -1)
            self.logprob[span] += chosen.double()
        self.out[torch.arange(first, first + n, device=self.device), self.count[span]] = tokens
        self.count[span] += 1
        self.next[span] = tokens
        self.sampler.saw(tokens, first)
        ended = torch.isin(tokens, self._eot) | (self.count[span] >= self.limit[span])
        over = set(ended.nonzero().flatten().tolist())
        live = [s - first for s in self._live if first <= s < first + n]
        if live:
            toks = tokens.tolist()
            for i in live:
                row = self.rows[first + i]
                if row.finished or toks[i] in self._eot_set:
                    continue
                row.job.ids.append(toks[i])
                try:
                    if row.text is not None and row.text.push(toks[i]):
                        over.add(i)  # a stop string
                except Exception as exc:  # the row's own text or callback
                    if not self.isolate_rows:
                        raise
                    self._fail(row, exc)
        for i in sorted(over):
            row = self.rows[first + i]
            if row.finished:  # failed: already answered
                continue
            row.finished = self._ended = True
            self._end(row, first + i)

    def _end(self, row: _Row, slot: int) -> None:
        """The job's final text is one decode of all its tokens, cut at a stop string."""
        job = row.job
        ids = self.out[slot, : int(self.count[slot])].tolist()
        if self.logprobs:
            job.logprob = float(self.logprob[slot])
        end = ids.pop() if ids and ids[-1] in self.eot else None
        try:
            text = end_reply(job, ids, end, self.tokenizer.decode(ids, skip_special_tokens=True))
            if row.text is not None:
                row.text.finish(text)
        except Exception as exc:  # the row's own text or callback
            if not self.isolate_rows:
                raise
            self._fail(row, exc)
            return
        job.done.set()
        if self._on_done is not None:
            self._on_done(job)

    def _drop(self) -> None:
        """Remove finished and cancelled rows; the last rows move down into their slots."""
        cancelled = [i for i in self._live if self.rows[i].job.cancelled.is_set()]
        if not (self._ended or cancelled):
            return
        n = len(self.rows)
        for i in cancelled:
            self.rows[i].finished = True
            self.rows[i].job.done.set()
        gone = [r.finished for r in self.rows]
        keep = n - sum(gone)
        holes = [i for i in range(keep) if gone[i]]
        movers = [i for i in range(keep, n) if not gone[i]]
        if holes:
            self.cache.move(movers, holes, int(self.lens[movers].max()))
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for t in (self.lens, self.next, self.count, self.limit, self.out, self.logprob):
                t[dst] = t[src]
            self.sampler.move(movers, holes)
            for s, d in zip(movers, holes, strict=True):
                self.rows[d] = self.rows[s]
        self.rows = self.rows[:keep]
        self._live = [i for i, r in enumerate(self.rows) if r.live]
        self._ended = False
        self.lens[keep:n] = 0  # the freed slots become padding rows
        self.next[keep:n] = self.pad
        self.sampler.changed()

    def fail_all(self, message: str) -> None:
        """A failed step fails every running row; the engine starts again empty."""
        for row in self.rows:
            row.job.error = message
            row.job.done.set()
        self._reset(self.cache.capacity, self.out.shape[1])


def end_reply(job: Job, ids: list[int], end_of_turn: int | None, text: str) -> str:
    """How every engine ends a reply (this one and llama.cpp's, infer/llamacpp.py): `ids` are
    the generated tokens without the end-of-turn one, `text` their decode; the text is cut at
    the first stop string, and the finish reason is "stop" for an end of turn or a stop string,
    else "length". Returns the final text."""
    text, stopped = cut_at_stop(text, job.params.stop)
    job.ids, job.text, job.end_of_turn = ids, text, end_of_turn
    job.finish_reason = "stop" if stopped or end_of_turn is not None else "length"
    return text


def _template_head(tokenizer) -> list[int]:
    """The tokens every single-turn chat prompt starts with: before the user's words."""
    from instill.data.render import render_prompt

    try:
        a, b = (render_prompt(tokenizer, [{"role": "user", "content": c}]) for c in "AZ")
    except Exception:  # no template, or one that wants something else: no head
        return []
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_layers(model) -> None:
    types = getattr(_text_config(model), "layer_types", None) or []
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise InstillError(
            f"{type(model).__name__} has {', '.join(other)} layers; instill's generation engine "
            "runs decoders whose layers all use full attention"
        )
