"""Cross-entropy on supervised positions only: the one definition of the supervised loss.

    SupervisedLM(model)(input_ids, labels, ...)  -> (loss sum, supervised tokens)
        used by the training step, the validation loss (train/loop.py) and, with per_row=True
        (each row's loss sum and token count), scoring:
    masked_logprobs(model, rows, pad)  each (ids, mask) row's summed log-probability, in padded
        batches: evaluation's likelihood (eval/likelihood.py) and the base replies' NLL
        (anchors.py), one definition with the training loss
    supervised_cross_entropy(head, hidden, labels)  the loss itself: labels shifted by one,
        IGNORE positions skipped
    token_cross_entropy(head, hidden, targets)  each given position's loss, for scoring (also
        the shared-prefix choice scoring of eval/likelihood.py, whose positions are not rows)

The decoder runs over every token, but the output projection (49k x 576 for SmolLM2, a fifth of
the model's compute per token) and the softmax run only where a label exists, in chunks, so the
full-vocabulary logits of prompt tokens are never materialised. The tokens every row of a padded
batch begins with (a chat template's system turn: 25 of the quickstart's ~67 tokens a row) run
once for the whole batch and reach every row as a KV cache (`shared_start`), in training and in
scoring alike: the same loss and gradients, less work. The module returns the loss *sum*
and the token count; the loop divides by the token count of the whole accumulated (and, with
several processes, global) batch, which makes batch 8 equal batch 2 x 4 accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from instill.data.dataset import labels_from, pad_right
from instill.train.compiled import eager

IGNORE = -100
Rows = Sequence[tuple[Sequence[int], Sequence[int]]]  # (token ids, mask 1 = scored) per row


def _logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _ce_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None
):
    return F.cross_entropy(_logits(head, hidden, softcap), targets, reduction="sum")


def _kl_sum(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    base_head: torch.nn.Module,
    base_hidden: torch.Tensor,
    softcap: float | None,
) -> torch.Tensor:
    """Sum over positions of KL(base || tuned) between the two next-token distributions."""
    log_q = F.log_softmax(_logits(head, hidden, softcap), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(_logits(base_head, base_hidden, softcap), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def chunked_kl(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    base_head: torch.nn.Module,
    base_hidden: torch.Tensor,
    chunk: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """KL(base || tuned) summed over positions, `chunk` positions at a time (recomputed in
    backward), so at most one chunk's two full-vocabulary distributions are alive."""
    args = (head, hidden, base_head, base_hidden, softcap)
    return _summed_in_chunks(_kl_sum, args, (1, 3), chunk)


def _summed_in_chunks(fn, args: tuple, sliced: tuple[int, ...], chunk: int) -> torch.Tensor:
    """fn(*args) summed over `chunk` rows at a time of the args at positions `sliced`; with more
    than one chunk, each but the last is recomputed in backward (activation checkpointing).

    The last chunk keeps what its backward needs from the forward: backward starts with it, so
    at that moment one chunk's logits are alive either way (kept, or just recomputed), and the
    peak is the same while one chunk's output-head pass is saved. The chunks are cut from the
    end, so the kept one is a whole `chunk` and the first takes the remainder."""
    n = args[sliced[0]].shape[0]
    if n <= chunk:
        return fn(*args)
    starts = [0, *reversed(range(n - chunk, 0, -chunk))]
    total = args[sliced[0]].new_zeros((), dtype=torch.float32)
    for i, (a, b) in enumerate(zip(starts, [*starts[1:], n], strict=True)):
        part = [x[a:b] if k in sliced else x for k, x in enumerate(args)]
        last = i == len(starts) - 1
        total = total + (fn(*part) if last else checkpoint(fn, *part, use_reentrant=False))
    return total


def chunked_cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies of `head(hidden)` against `targets`, `chunk` rows at a time.

    With more than one chunk each chunk is recomputed in backward (activation checkpointing), so
    at most one chunk's logits are alive at any time.
    """
    return _summed_in_chunks(_ce_sum, (head, hidden, targets, softcap), (1, 2), chunk)


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, keep): position t predicts labels[t+1], and keep marks the positions whose
    target is not IGNORE (the supervised ones). The supervised loss and the preference losses'
    reply log-probs (train/preference.py) both start here."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE


def kept_rows(keep: torch.Tensor) -> torch.Tensor:
    """The row of each kept position, in the order `x[keep]` lists the positions."""
    return torch.arange(len(keep), device=keep.device).unsqueeze(1).expand_as(keep)[keep]


def supervised_cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
    softcap: float | None = None,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every supervised position's next token: position t predicts labels[t+1],
    and positions whose label is IGNORE are skipped. Returns (loss sum, supervised tokens) or,
    with per_row (scoring, no gradients needed), each row's loss sum in float64 and its
    supervised tokens."""
    targets, keep = shifted_targets(labels)
    if not per_row:
        loss_sum = chunked_cross_entropy(head, hidden[:, :-1][keep], targets[keep], chunk, softcap)
        return loss_sum, keep.sum()
    rows = kept_rows(keep)
    sums = torch.zeros(len(labels), dtype=torch.float64, device=hidden.device)
    ce = token_cross_entropy(head, hidden[:, :-1][keep], targets[keep], chunk, softcap)
    sums.index_add_(0, rows, ce.double())
    return sums, keep.sum(dim=1)


def token_cross_entropy(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Each position's cross-entropy of `head(hidden)` against `targets`, `chunk` positions at a
    time (for scoring: no gradients are kept, so each chunk's logits die with it)."""
    parts = [
        F.cross_entropy(
            _logits(head, hidden[i : i + chunk], softcap), targets[i : i + chunk], reduction="none"
        )
        for i in range(0, len(targets), chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def causal_suffices(attention_mask, position_ids) -> bool:
    """Whether a batch's padding mask can be dropped: every row right-padded (its real tokens
    first, from position 0) and no position ids of its own. Causal attention alone then gives
    every real token exactly what the mask gives it (no real token ever sees a later pad), and
    attention kernels skip the cells above the diagonal instead of computing them all and
    masking them (sdpa on a CPU: a forward of SmolLM2-135M at [8, 430] ~12% faster). The pad
    positions' own states change, and nothing reads them."""
    if attention_mask is None or position_ids is not None or attention_mask.dim() != 2:
        return False
    real = attention_mask != 0
    return bool(real[:, 0].all() and (real[:, 1:] <= real[:, :-1]).all())


def _hidden(body, input_ids, attention_mask, position_ids) -> torch.Tensor:
    if causal_suffices(attention_mask, position_ids):
        attention_mask = None
    return body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state


# A shared start shorter than this is not worth its second model call.
MIN_SHARED_START = 8


def shared_start(input_ids, labels, attention_mask, position_ids) -> int:
    """How many leading tokens every row of a padded batch shares and needs no hidden state of:
    the same ids, attended (no left padding), at positions 0.. (not a packed row), and no label
    at or before the last of them (labels[:, :n + 1] all IGNORE, so no position before n
    predicts a scored token). 0 when under MIN_SHARED_START or when the batch has one row."""
    if position_ids is not None or input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    unscored = (labels == IGNORE).all(dim=0)
    ok = same & unscored
    if attention_mask is not None:
        ok &= (attention_mask != 0).all(dim=0)
    # the shared start ends before the first column that fails; one unscored column of room
    # is kept after it (position n - 1 would predict labels[:, n])
    bad = (~ok).nonzero()
    n = int(bad[0]) if len(bad) else input_ids.shape[1]
    n = min(n - 1, input_ids.shape[1] - 1)
    return n if n >= MIN_SHARED_START else 0


def _hidden_sharing_start(body, input_ids, attention_mask, n: int) -> torch.Tensor:
    """The last hidden states of positions n.. of every row, the first n tokens (which every
    row shares: shared_start) run once for the whole batch and their keys and values given to
    every row. Exact: a causal model's states at positions < n depend only on those tokens, so
    the one computation equals each row's own (up to float rounding), and in backward the
    gradients of every row flow into it."""
    rows, width = input_ids.shape
    cache = body(input_ids=input_ids[:1, :n], use_cache=True).past_key_values
    cache.batch_repeat_interleave(rows)
    mask = attention_mask
    if mask is None:
        mask = torch.ones_like(input_ids)
    positions = torch.arange(n, width, device=input_ids.device).expand(rows, -1)
    return body(
        input_ids=input_ids[:, n:],
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state


def _parts(model: torch.nn.Module):
    """(decoder body, output head, config) of a causal LM, plain or peft-wrapped."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if get_base is not None else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings(), base.config


def shares_prefixes(model: torch.nn.Module) -> bool:
    """Whether the model's attention takes a shared prefix as a KV cache beside a mask of its
    own (a padding mask here, shared_start; the packed 4D mask of eval/likelihood.py): sdpa and
    eager do, flash attention does not."""
    return getattr(_parts(model)[2], "_attn_implementation", None) in ("sdpa", "eager")


class SupervisedLM(torch.nn.Module):
    """Wraps a causal LM (plain or peft) so that forward returns (loss sum, supervised tokens).

    This is our own module, not a patched `forward`: accelerate wraps *it* for DDP/FSDP, so
    gradient synchronisation sees the whole computation.

    kl_weight > 0 adds kl_weight x KL(base || tuned), summed over the supervised positions of
    replay rows (a batch's `replay_mask`; the training loop passes one, all False when the
    micro-batch has no replay rows, and scoring none), to the loss sum. The base distribution
    comes from `reference` (a frozen copy, for full fine-tuning) or, for a peft model, from the
    same model with its adapters switched off: no second copy of the weights.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk: int = 1024,
        kl_weight: float = 0.0,
        reference: torch.nn.Module | None = None,
        share_start: bool = True,
    ):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.kl_weight = kl_weight
        # the batch's shared start run once (shared_start); off where a second model call
        # does not fit: compiled layers, gradient checkpointing, sharded weights
        self.share_start = share_start and shares_prefixes(model)
        self._reference = [reference]  # a list: not a submodule (no gradients, never wrapped)
        self.last_kl: tuple[float, int] | None = None  # last forward: (KL sum, positions)

    def _base_hidden(self, input_ids, attention_mask, position_ids):
        """The base model's last hidden states and head, without gradients."""
        ref = self._reference[0]
        with torch.no_grad():
            if ref is not None:
                body, head, _ = _parts(ref)
                ctx = contextlib.nullcontext()
            else:
                body, head, _ = _parts(self.model)
                ctx = self.model.disable_adapter()
            with ctx, eager():  # no compiled graphs for the no-grad, adapter-less shapes
                hidden = _hidden(body, input_ids, attention_mask, position_ids)
        return hidden, head

    def forward(
        self,
        input_ids,
        labels,
        attention_mask=None,
        position_ids=None,
        replay_mask=None,
        per_row: bool = False,
    ):
        """(loss sum, supervised tokens); per_row: (each row's loss sum, each row's tokens),
        without the KL term (for scoring, not training)."""
        body, head, config = _parts(self.model)
        softcap = getattr(config, "final_logit_softcapping", None)
        self.last_kl = None
        with_kl = self.kl_weight > 0 and replay_mask is not None and not per_row
        n = 0
        if self.share_start and not with_kl:
            n = shared_start(input_ids, labels, attention_mask, position_ids)
        if n:
            hidden = _hidden_sharing_start(body, input_ids, attention_mask, n)
            # position n - 1 predicts no scored token (shared_start), so the loss is the same
            # over positions n.. alone
            return supervised_cross_entropy(
                head, hidden, labels[:, n:], self.chunk, softcap, per_row
            )
        hidden = _hidden(body, input_ids, attention_mask, position_ids)
        loss_sum, tokens = supervised_cross_entropy(
            head, hidden, labels, self.chunk, softcap, per_row
        )
        if with_kl:
            kl_pos = (labels[:, 1:] != IGNORE) & replay_mask[:, 1:]
            kl = self._kl(head, hidden, kl_pos, input_ids, attention_mask, position_ids, softcap)
            if kl is not None:
                self.last_kl = (float(kl.detach()), int(kl_pos.sum()))
                loss_sum = loss_sum + self.kl_weight * kl
        return loss_sum, tokens

    def _kl(self, head, hidden, kl_pos, input_ids, attention_mask, position_ids, softcap):
        """KL(base || tuned) summed over `kl_pos` (the supervised positions of replay rows), or
        None when there are none. The base forward runs either way (over one token when there
        are none): under train.shard: fsdp, LoRA's base is the sharded layers themselves, whose
        forward gathers each layer's weights from every process, so every process must run it
        whatever rows its micro-batch holds, or the processes' collectives stop matching."""
        rows = kl_pos.any(dim=1)
        if not bool(rows.any()):
            first = lambda t: None if t is None else t[:1, :1]  # noqa: E731
            self._base_hidden(first(input_ids), first(attention_mask), first(position_ids))
            return None
        sub = lambda t: None if t is None else t[rows]  # noqa: E731
        base_hidden, base_head = self._base_hidden(
            input_ids[rows], sub(attention_mask), sub(position_ids)
        )
        return chunked_kl(
            head,
            hidden[:, :-1][kl_pos],
            base_head,
            base_hidden[:, :-1][kl_pos[rows]],
            self.chunk,
            softcap,
        )


# --- scoring: each row's log-probability, for evaluation and the anchors' replies ---------------


@dataclass(frozen=True)
class ReplyScore:
    logprob: float  # sum of the reply tokens' log-probabilities
    tokens: int  # how many reply tokens were scored

    @property
    def mean(self) -> float:
        return self.logprob / self.tokens if self.tokens else float("-inf")


@torch.inference_mode()
def masked_logprobs(model, rows: Rows, pad: int, *, batch_size: int = 8) -> list[ReplyScore]:
    """For each (token ids, mask) row, the summed log-probability of the tokens where the mask
    is 1, each given everything before it. Rows are length-sorted into padded batches."""
    lm, device = SupervisedLM(model), next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out: list[ReplyScore | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, attn, target_mask = pad_right([rows[i] for i in idx], pad)
        losses, counts = lm(
            input_ids=ids.to(device),
            labels=labels_from(ids, target_mask).to(device),
            attention_mask=attn.to(device),
            per_row=True,
        )
        for r, i in enumerate(idx):
            out[i] = ReplyScore(-float(losses[r]) if counts[r] else 0.0, int(counts[r]))
    return out  # type: ignore[return-value]
