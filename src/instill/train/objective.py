"""Training objectives: what a row is, how rows make a batch, and what the batch's loss is.

    objective = make_objective(cfg)           train.objective: sft, dpo, simpo, orpo, kto
    objective.collate(rows, pad_id)           one micro-batch (tensors, plus "real_tokens")
    objective.units(batch)                    what the loss is divided by: supervised tokens
                                              (sft) or pairs / rows (preference), counted
                                              before the forward, summed over the whole step
    objective.module(model, reference)        an nn.Module whose forward(**batch) returns
                                              (loss sum, units); accelerate wraps it for DDP,
                                              train/shard.py shards it for FSDP
    objective.needs_reference                 whether a frozen reference model must exist

The loop (train/loop.py) knows nothing else about the objective: the same accumulation, scaling
by the global unit count, clipping, checkpoints and exact resume serve every one of them. A
module may leave `last_figures` ({name: (sum, count)}, detached floats) after each forward; the
loop sums them over the micro-batches, steps and processes between two logs and writes each
mean into metrics.jsonl (a preference run logs its rewards, margin, accuracy and per-token
log-probs there, so a falling chosen log-prob is visible).

Pair rows are batched chosen-first: a micro-batch of B pairs is one padded batch of 2B
sequences (B chosen, then B rejected), one forward. KTO rows are batched with their KL partners:
B completions, then the same B prompts each followed by another row's completion (kl_partners),
whose log-probs give KTO's reference point without gradients.

The reference model's log-probs come from, in order: the rows themselves (precomputed before
training, train.preference.precompute_reference), a frozen copy (full fine-tuning), or the same
model with its adapters switched off (LoRA: no second copy of the weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from instill.config import TrainConfig
from instill.data.dataset import Row, collate, labels_from, pad_right
from instill.data.packing import best_fit
from instill.data.preference_tokens import LabelledRow, PairRow, rows_sha256
from instill.errors import InstillError
from instill.train.compiled import eager
from instill.train.loss import IGNORE, SupervisedLM, _hidden, _parts
from instill.train.preference import (
    Logps,
    dpo_loss,
    kl_partners,
    kto_kl,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

PREFERENCE = ("dpo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


def reference_hidden(model, reference, input_ids, attention_mask, position_ids=None):
    """The reference's last hidden states and output head, without gradients: `reference`'s
    (a frozen copy) when given, else `model`'s own with its adapters switched off."""
    with torch.no_grad():
        if reference is not None:
            body, head, _ = _parts(reference)
            ctx = contextlib.nullcontext()
        else:
            body, head, _ = _parts(model)
            ctx = model.disable_adapter()
        with ctx, eager():  # no compiled graphs for the no-grad, adapter-less shapes
            hidden = _hidden(body, input_ids, attention_mask, position_ids)
    return hidden, head


class Supervised:
    """train.objective: sft. Rows are data.dataset.Row; the loss is SupervisedLM's token sum."""

    name = "sft"
    needs_reference = False
    row_type = Row
    units_name = "supervised_tokens"  # what metrics.jsonl calls the step's loss divisor

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def collate(self, rows: list[Row], pad_id: int) -> dict:
        return collate(rows, pad_id)

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def module(self, model, reference=None) -> torch.nn.Module:
        cfg = self.cfg
        # the shared start's second model call: not into compiled layers (a graph per call
        # shape), checkpointed layers (they take no cache) or sharded ones
        share = not (cfg.compile or cfg.gradient_checkpointing or cfg.shard == "fsdp")
        return SupervisedLM(model, kl_weight=cfg.kl_to_base, reference=reference, share_start=share)


def _sequences(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    ids, attn, mask = pad_right(pairs, pad_id)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "labels": labels_from(ids, mask),
        "real_tokens": attn.sum(),
    }


def _packed(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, width: int) -> dict:
    """A micro-batch's sequences packed best-fit into rows of at most `width` tokens, each
    sequence's positions restarting at 0 and no attention mask (so attention stays inside each
    sequence, as data/packing.py's supervised packing): no padding between sequences, only at
    the end of the shorter rows. `sequence_index` maps every position to its sequence (the
    order of `seqs`; -1: padding)."""
    bins = best_fit([len(ids) for ids, _ in seqs], width)
    packed = []
    for b in bins:
        ids: list[int] = []
        mask: list[int] = []
        for j in b:
            ids += seqs[j][0]
            mask += [0, *seqs[j][1][1:]]  # a sequence's first token is never a target
        packed.append((ids, mask))
    ids, attn, mask = pad_right(packed, pad_id)
    pos = torch.zeros_like(ids)
    index = torch.full_like(ids, -1)
    for r, b in enumerate(bins):
        at = 0
        for j in b:
            n = len(seqs[j][0])
            pos[r, at : at + n] = torch.arange(n)
            index[r, at : at + n] = j
            at += n
        pos[r, at:] = torch.arange(ids.shape[1] - at)  # padding forms its own segment
    return {
        "input_ids": ids,
        "labels": labels_from(ids, mask),
        "position_ids": pos,
        "sequence_index": index,
        "n_sequences": torch.tensor(len(seqs)),
        "real_tokens": attn.sum(),
    }


def is_replay(row) -> bool:
    """A replay row (data.replay) mixed into a preference run: the starting model's own reply
    to a general prompt, a supervised Row among the pairs."""
    return isinstance(row, Row)


def split_replay(rows: list) -> tuple[list, list]:
    """(preference rows, replay rows) of a micro-batch, each in its order."""
    return [r for r in rows if not is_replay(r)], [r for r in rows if is_replay(r)]


def _precomputed(rows) -> list[float] | None:
    rows = split_replay(rows)[0]
    refs = [r.reference for r in rows]
    if all(r is None for r in refs):
        return None
    if any(r is None for r in refs):
        raise InstillError("some rows have precomputed reference log-probs and some do not")
    # in the batch's order: every row's first sequence (chosen, completion), then every second
    return [r[0] for r in refs] + [r[1] for r in refs]


class Preference:
    """train.objective: dpo, simpo, orpo (pair rows) or kto (labelled rows)."""

    row_type = PairRow

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.name = cfg, cfg.objective
        self.p = cfg.preference
        self.needs_reference = self.name not in REFERENCE_FREE
        self.units_name = "pairs"
        # data.packing: each micro-batch's sequences packed into rows of this many tokens
        self.pack_length: int | None = None
        if self.name == "kto":
            self.row_type, self.units_name = LabelledRow, "rows"

    @property
    def beta(self) -> float:
        return self.p.beta_for(self.name)

    def check_rows(self, rows: list, where: str) -> None:
        wrong = next(
            (
                r
                for r in rows
                if not isinstance(r, self.row_type) and not (is_replay(r) and r.replay)
            ),
            None,
        )
        if wrong is not None:
            want = "labelled rows (prompt, completion, label)" if self.name == "kto" else "pairs"
            raise InstillError(
                f"train.objective: {self.name} trains on {want}, but {where} holds "
                f"{type(wrong).__name__} rows (first: {getattr(wrong, 'source', '?')})"
            )

    def sequences(self, rows: list) -> list[tuple[list[int], list[int]]]:
        """The (ids, mask) sequences of a micro-batch, in the order the module reads them: the
        preference rows' (below), then the replay rows' (data.replay), one each."""
        rows, replay = split_replay(rows)
        tail = [(r.input_ids, r.mask) for r in replay]
        if self.name != "kto":
            return [r.chosen() for r in rows] + [r.rejected() for r in rows] + tail
        partners = kl_partners(len(rows))
        mismatched = [
            (r.prompt_ids + rows[j].completion_ids, [0] * len(r.prompt_ids)
             + rows[j].completion_mask)
            for r, j in zip(rows, partners, strict=True)
        ]  # fmt: skip
        return [r.sequence() for r in rows] + mismatched + tail

    def collate(self, rows: list, pad_id: int) -> dict:
        seqs = self.sequences(rows)
        if self.pack_length:
            batch = _packed(seqs, pad_id, self.pack_length)
        else:
            batch = _sequences(seqs, pad_id)
        prefs, replay = split_replay(rows)
        if replay:  # the last n_replay sequences are replay rows
            batch["n_replay"] = torch.tensor(len(replay))
        if self.name == "kto":
            batch["desirable"] = torch.tensor([r.desirable for r in prefs])
            # the partners' tokens are processed too, but only the completions are trained
            batch["real_tokens"] = torch.tensor(sum(r.tokens for r in rows))
        refs = _precomputed(rows)
        if refs is not None:
            batch["reference_logps"] = torch.tensor(refs, dtype=torch.float32)
        return batch

    def units(self, batch: dict) -> int:
        """Pairs (kto: rows), plus one per replay row."""
        seqs = int(batch["n_sequences"]) if "n_sequences" in batch else len(batch["input_ids"])
        replay = int(batch.get("n_replay", 0))
        return (seqs - replay) // 2 + replay

    def module(self, model, reference=None) -> torch.nn.Module:
        return PreferenceLM(model, self, reference)

    def loss(self, policy: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None, batch):
        """(per-unit losses, {figure: (sum, count)}) of one micro-batch from its sequences'
        summed log-probs (policy with gradients; ref without)."""
        p, n = self.p, len(policy) // 2
        if self.name == "kto":
            kl = kto_kl(policy[n:].detach(), ref[n:])
            out = kto_loss(
                policy[:n], ref[:n], batch["desirable"], kl, self.beta,
                p.desirable_weight, p.undesirable_weight,
            )  # fmt: skip
            return out.losses, _kto_figures(out.figures, policy[:n], tokens[:n])
        pol = Logps(policy[:n], policy[n:], tokens[:n], tokens[n:])
        if self.name == "dpo":
            refs = Logps(ref[:n], ref[n:], tokens[:n], tokens[n:])
            out = dpo_loss(pol, refs, self.beta, p.loss_type, p.label_smoothing, p.sft_weight)
        elif self.name == "simpo":
            out = simpo_loss(pol, self.beta, p.gamma, p.label_smoothing, p.sft_weight)
        else:
            out = orpo_loss(pol, self.beta)
        figures = {k: (float(v.sum()), len(v)) for k, v in out.figures.items()}
        return out.losses, figures


def _kto_figures(fig: dict, policy: torch.Tensor, tokens: torch.Tensor) -> dict:
    good = fig["desirable"].bool()
    mean_logp = (policy.detach() / tokens).float()
    return {
        "chosen_reward": (float(fig["reward"][good].sum()), int(good.sum())),
        "rejected_reward": (float(fig["reward"][~good].sum()), int((~good).sum())),
        "chosen_logp": (float(mean_logp[good].sum()), int(good.sum())),
        "rejected_logp": (float(mean_logp[~good].sum()), int((~good).sum())),
        "kl": (float(fig["kl"][:1].sum()) * len(good), len(good)),
    }


class PreferenceLM(torch.nn.Module):
    """Wraps a causal LM (plain or peft) so that forward returns (sum of per-unit preference
    losses, units) for a batch built by Preference.collate; `last_figures` holds the batch's
    figures. The reference (when the objective has one) is taken from the batch's
    reference_logps, a frozen copy, or the model with its adapters off."""

    def __init__(self, model, objective: Preference, reference=None, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.objective = objective
        self.chunk = chunk
        self._reference = [reference]  # a list: not a submodule (no gradients, never wrapped)
        self.last_figures: dict[str, tuple[float, int]] | None = None

    def _softcap(self):
        return getattr(_parts(self.model)[2], "final_logit_softcapping", None)

    def reference_logps(
        self, input_ids, labels, attention_mask, position_ids=None, index=None, n=None
    ) -> torch.Tensor:
        """Each sequence's summed reply log-prob under the reference, without gradients."""
        hidden, head = reference_hidden(
            self.model, self._reference[0], input_ids, attention_mask, position_ids
        )
        with torch.no_grad():
            logps, _ = sequence_logps(head, hidden, labels, self.chunk, self._softcap(), index, n)
        return logps

    def forward(
        self, input_ids, labels, attention_mask=None, reference_logps=None, desirable=None,
        position_ids=None, sequence_index=None, n_sequences=None, n_replay=None,
    ):  # fmt: skip
        """Packed batches (Preference.collate with pack_length) carry position_ids,
        sequence_index and n_sequences instead of an attention mask. `n_replay`: the batch's
        last sequences are that many replay rows, each adding its mean token NLL as one unit
        (the supervised term that holds the model to its start on general prompts)."""
        body, head, _ = _parts(self.model)
        hidden = _hidden(body, input_ids, attention_mask, position_ids)
        n = None if n_sequences is None else int(n_sequences)
        policy, tokens = sequence_logps(
            head, hidden, labels, self.chunk, self._softcap(), sequence_index, n
        )
        m = 0 if n_replay is None else int(n_replay)
        k = len(policy) - m  # the preference rows' sequences come first
        ref = reference_logps  # precomputed (absent from a batch of replay rows only)
        precomputed = self.objective.p.precompute_reference
        if self.objective.needs_reference and ref is None and (k or not precomputed):
            # one reference forward per micro-batch, on every process alike (sharded processes
            # gather weights together), even for a batch of replay rows only (except where
            # the reference was precomputed: then no process runs one); unpacked, it skips
            # the replay rows' sequences where there are pairs
            if sequence_index is None and 0 < k < len(policy):
                mask = None if attention_mask is None else attention_mask[:k]
                ref = self.reference_logps(input_ids[:k], labels[:k], mask)
            else:
                ref = self.reference_logps(
                    input_ids, labels, attention_mask, position_ids, sequence_index, n
                )[:k]
        figures: dict[str, tuple[float, int]] = {}
        losses = policy.new_zeros(0)
        if k:
            batch = {"desirable": desirable}
            losses, figures = self.objective.loss(policy[:k], tokens[:k], ref, batch)
        if m:
            nll = -policy[k:] / tokens[k:].clamp(min=1)
            losses = torch.cat([losses, nll])
            figures["replay_nll"] = (float(nll.detach().sum()), m)
        self.last_figures = figures
        return losses.sum(), torch.tensor(len(losses))


def make_objective(cfg: TrainConfig):
    return Supervised(cfg) if cfg.objective == "sft" else Preference(cfg)


@torch.no_grad()
def precompute_reference(model, objective: Preference, rows: list, pad_id: int, batch_size: int,
                         reference=None) -> list:  # fmt: skip
    """`rows` with each one's reference log-probs set (PairRow: (chosen, rejected); LabelledRow:
    (completion, KL partner's)), scored once before training, so the loop runs no reference
    forward. (KTO's KL partner depends on the batch a row lands in, so KTO is refused with
    precompute_reference by the recipe's checks.)"""
    was = model.training
    model.eval()
    if reference is None and not hasattr(model, "disable_adapter"):
        reference = model  # full fine-tuning, before its first step: the model is the reference
    lm = PreferenceLM(model, objective, reference)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = _sequences(objective.sequences(part), pad_id)
        logps = lm.reference_logps(
            batch["input_ids"].to(device), batch["labels"].to(device),
            batch["attention_mask"].to(device),
        ).double().cpu()  # fmt: skip
        n = len(part)
        for k, row in enumerate(part):
            out.append(replace(row, reference=(float(logps[k]), float(logps[n + k]))))
    model.train(was)
    return out


@dataclass
class Figures:
    """Figures summed over micro-batches (and processes) until the next log."""

    sums: dict[str, list[float]]

    @classmethod
    def empty(cls) -> Figures:
        return cls({})

    def add(self, figures: dict[str, tuple[float, int]] | None) -> None:
        for k, (s, n) in (figures or {}).items():
            acc = self.sums.setdefault(k, [0.0, 0.0])
            acc[0] += s
            acc[1] += n

    def means(self, acc) -> dict[str, float]:
        """Every figure's mean over all processes' units since the last call; cleared. Every
        process calls it at the same steps (a collective with several processes)."""
        names = sorted(self.sums)
        flat = [x for k in names for x in self.sums[k]]
        self.sums.clear()
        if not names:
            return {}
        if acc is not None and acc.num_processes > 1:
            local = torch.tensor(flat, dtype=torch.float64, device=acc.device)
            flat = acc.reduce(local, reduction="sum").tolist()
        return {k: flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(names) if flat[2 * i + 1]}


def cached_reference(model, objective: Preference, rows: list, pad_id: int, batch_size: int,
                     autocast: torch.dtype | None = None):  # fmt: skip
    """precompute_reference through a cache under $INSTILL_HOME/reference-cache, keyed by the
    model's weights (every tensor: the reference is the start), the tokenised pairs (so the
    data, the chat template and the length policy), the autocast dtype the caller scores under
    (train.autocast) and the code's version: a second run on the
    same start and pairs (another beta, learning rate or method) reads them instead of scoring.
    A cache that cannot be written only costs the scoring next time."""
    import hashlib

    import numpy as np

    from instill.atomic import WriteError, atomic_file
    from instill.console import console
    from instill.home import instill_home
    from instill.models.load import model_digest

    prefs, replay = split_replay(rows)  # replay rows (data.replay) have no reference
    if replay:
        it = iter(cached_reference(model, objective, prefs, pad_id, batch_size, autocast))
        return [r if is_replay(r) else next(it) for r in rows]
    parts = ["v1", model_digest(model), rows_sha256(rows)]
    if autocast is not None:
        parts.append(str(autocast))
    key = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
    path = instill_home() / "reference-cache" / f"{key}.npy"
    if path.is_file():
        try:
            refs = np.load(path, allow_pickle=False)
            if refs.shape == (len(rows), 2):
                return [replace(r, reference=(float(a), float(b)))
                        for r, (a, b) in zip(rows, refs.tolist(), strict=True)]  # fmt: skip
        except (OSError, ValueError):
            pass  # a damaged entry is scored again
    out = precompute_reference(model, objective, rows, pad_id, batch_size)
    try:
        with atomic_file(path, "reference cache", "INSTILL_HOME") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray([r.reference for r in out], dtype=np.float64))
    except WriteError as exc:
        console.print(f"[yellow]reference log-probs not cached[/yellow]: {exc}", soft_wrap=True)
    return out
