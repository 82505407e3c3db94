"""The next token of every running row from one batch of logits, each row by its own settings.

    logits [rows, vocab] -> greedy rows: argmax (the whole batch at once)
    rows that sample or penalise repetition, together:
      repetition penalty -> temperature -> top-k -> top-p -> softmax
      -> greedy-with-penalty rows: argmax; sampling rows: argmax(p / q), q ~ Exp(1) drawn from
         the row's own generator (torch.multinomial's own draw for one sample)

Each step is the same from transformers' processors for one row (`RepetitionPenalty`,
`Temperature`, `TopK`, `TopP`, then `multinomial`), written once for all rows with per-row
settings as tensors. A row's draw comes only from its own generator, seeded from `params.seed`,
so a seeded reply is the same whatever shares its batch and whichever caller asked; the one
piece of per-row Python is that draw (sampling rows only).
"""

from __future__ import annotations

import torch


class Sampler:
    """Per-slot settings as tensors; rows move between slots with the engine's rows."""

    def __init__(self, slots: int, device: torch.device):
        self.device = device
        self.temperature = torch.ones(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.top_p_rest = torch.zeros(slots, device=device)  # 1 - top_p, taken in double
        self.penalty = torch.ones(slots, device=device)
        self.seen: torch.Tensor | None = None  # [slots, vocab] tokens in each row's history
        self.generators: list[torch.Generator | None] = [None] * slots
        self.special: list[bool] = [False] * slots  # samples or penalises: not plain argmax
        self._rows: tuple | None = None  # which rows need more than argmax, for (first, n)

    def admit(self, slot: int, params, prompt: list[int], vocab: int) -> None:
        self.temperature[slot] = params.temperature if params.temperature > 0 else 1.0
        self.top_k[slot] = params.top_k if params.temperature > 0 else 0
        self.top_p[slot] = params.top_p if params.temperature > 0 else 1.0
        self.top_p_rest[slot] = 1 - params.top_p if params.temperature > 0 else 0.0
        self.penalty[slot] = params.repetition_penalty
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            if params.seed is not None:
                gen.manual_seed(params.seed)
            else:
                gen.seed()
        self.generators[slot] = gen
        self.special[slot] = params.temperature > 0 or params.repetition_penalty != 1.0
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(
                    len(self.special), vocab, dtype=torch.bool, device=self.device
                )
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt, device=self.device)] = True
        self._rows = None

    def move(self, src: list[int], dst: list[int]) -> None:
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for t in (self.temperature, self.top_k, self.top_p, self.top_p_rest, self.penalty):
            t[d] = t[s]
        if self.seen is not None:
            self.seen[d] = self.seen[s]
        for a, b in zip(src, dst, strict=True):
            self.generators[b], self.special[b] = self.generators[a], self.special[a]
        self._rows = None

    def changed(self) -> None:
        """The running rows changed (some left): look up which ones need more than argmax."""
        self._rows = None

    def choose(self, logits: torch.Tensor, first: int = 0) -> torch.Tensor:
        """The next token of the rows in slots first.. from their logits [rows, vocab]."""
        n = logits.shape[0]
        chosen = logits.argmax(-1)
        if self._rows is None or self._rows[0] != (first, n):
            slots = [s for s in range(first, first + n) if self.special[s]]
            drawn = [s for s in slots if self.generators[s] is not None]
            self._rows = (
                (first, n),
                torch.tensor(slots, dtype=torch.long, device=self.device),
                torch.tensor([s - first for s in slots], dtype=torch.long, device=self.device),
                torch.tensor([slots.index(s) for s in drawn], dtype=torch.long),
                drawn,
            )
        _, special, at, drawn_at, drawn = self._rows
        if len(special) == 0:
            return chosen
        scores = logits.index_select(0, at)
        if self.seen is not None:
            penalty = self.penalty[special, None]
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen.index_select(0, special), penalised, scores)
        scores = scores / self.temperature[special, None]
        top_k = self.top_k[special]
        if bool((top_k > 0).any()):
            k = int(top_k.max().clamp(max=scores.shape[-1]))
            kth = torch.topk(scores, k)[0].gather(1, (top_k.clamp(min=1, max=k) - 1)[:, None])
            scores = scores.masked_fill((scores < kth) & (top_k > 0)[:, None], -float("inf"))
        top_p = self.top_p[special]
        if bool((top_p < 1.0).any()):
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = (cumulative <= self.top_p_rest[special, None]) & (top_p < 1.0)[:, None]
            drop[:, -1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        picked = scores.argmax(-1)  # greedy rows with a repetition penalty
        if drawn:
            probs = scores[drawn_at].softmax(dim=-1)
            q = torch.empty_like(probs)
            for j, s in enumerate(drawn):
                q[j].exponential_(1, generator=self.generators[s])
            picked[drawn_at] = (probs / q).argmax(-1)
        chosen[at] = picked
        return chosen

    def saw(self, tokens: torch.Tensor, first: int = 0) -> None:
        """The rows in slots first.. took `tokens`: from now on they count for the penalty."""
        if self.seen is not None:
            rows = torch.arange(first, first + tokens.shape[0], device=self.device)
            self.seen[rows, tokens] = True
