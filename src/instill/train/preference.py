"""Preference losses: pure functions over per-sequence log-probabilities.

    sequence_logps(head, hidden, labels)        each row's summed reply log-prob, reply tokens
    model_logps(model, input_ids, labels, ...)  the same from a causal LM (plain or peft)
    Logps(chosen, rejected, chosen_tokens, rejected_tokens)   one batch of pairs' log-probs
    dpo_loss(policy, reference, beta, loss_type)   sigmoid (DPO), ipo, hinge
    simpo_loss(policy, beta, gamma)             reference-free, length-normalised, margin gamma
    orpo_loss(policy, beta)                     reference-free, supervised NLL + odds ratio
    kto_loss(policy, reference, desirable, kl)  unpaired rows; kl from kto_kl over kl_partners

Every loss returns a PreferenceLoss: one loss per pair (per row for KTO), whose batch loss is
their mean, and per-pair figures (detached) for the log. A loss per pair, rather than a batch
mean, lets the loop normalise by the number of pairs in the whole accumulated (and, with several
processes, global) batch, as the supervised loss is normalised by its tokens.

Figures (TRL logs the same under rewards/*): chosen_reward and rejected_reward (the implicit
reward, beta x log-ratio to the reference; for the reference-free methods beta x mean token
log-prob), margin (chosen - rejected reward), accuracy (1 where the chosen reward is strictly
higher, so ties, as at the start of DPO, count 0, as in TRL), chosen_logp and rejected_logp (mean
log-prob per reply token, comparable across lengths, so a falling chosen log-prob is visible).

Peers' defaults, for the README beside ours (ours in brackets):
    DPO sigmoid  TRL DPOConfig beta 0.1, label_smoothing 0; torchtune DPOLoss beta 0.1  [0.1, 0]
    IPO          TRL loss_type="ipo", beta is tau, 0.1; torchtune IPOLoss tau 0.1      [tau 0.1]
    hinge        TRL loss_type="hinge" beta 0.1; torchtune RSOLoss gamma 0.1           [0.1]
    SimPO        TRL CPOConfig(loss_type="simpo") beta 0.1, simpo_gamma 0.5, cpo_alpha 1.0 (the
                 SimPO paper sets cpo_alpha 0); torchtune SimPOLoss beta 2.0, gamma 0.5; the
                 paper tunes beta 2.0-2.5 and gamma 0.5-1.4 per model       [beta 2.0, gamma 0.5]
    ORPO         TRL ORPOConfig beta 0.1 (the paper's lambda)                           [0.1]
    KTO          TRL KTOConfig beta 0.1, desirable_weight 1.0, undesirable_weight 1.0   [same]
    supervised term on chosen: TRL rpo_alpha (None: off), CPO's cpo_alpha   [sft_weight 0: off]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from instill.train.loss import (
    _hidden,
    _logits,
    _parts,
    _summed_in_chunks,
    kept_rows,
    shifted_targets,
)

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _row_logp_sums(head, hidden, targets, rows, n_rows: int, softcap):
    logp = -F.cross_entropy(_logits(head, hidden, softcap), targets, reduction="none")
    return logp.new_zeros(n_rows).index_add(0, rows, logp)


def sequence_logps(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 1024,
    softcap: float | None = None,
    index: torch.Tensor | None = None,
    n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens (float32, with gradients) and
    its count of labelled tokens: position t predicts labels[t+1]; IGNORE positions (prompt,
    padding) are skipped. As in the supervised loss (train/loss.py), the output projection runs
    only on labelled positions, `chunk` at a time, each recomputed in backward.

    Packed rows (several sequences per row): `index` gives each position's sequence (-1 for
    padding) and `n` their number; the sums are then per sequence. A sequence's first token is
    never labelled, so no target crosses from one sequence into the next."""
    targets, keep = shifted_targets(labels)
    if index is None:
        rows = kept_rows(keep)
        n, counts = len(labels), keep.sum(dim=1)
    else:
        rows = index[:, 1:][keep]
        counts = torch.bincount(rows, minlength=n)
    args = (head, hidden[:, :-1][keep], targets[keep], rows, n, softcap)
    return _summed_in_chunks(_row_logp_sums, args, (1, 2, 3), chunk), counts


def model_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of a causal LM (plain or peft-wrapped) over a padded batch."""
    body, head, config = _parts(model)
    hidden = _hidden(body, input_ids, attention_mask, position_ids)
    return sequence_logps(
        head, hidden, labels, chunk, getattr(config, "final_logit_softcapping", None)
    )


@dataclass(frozen=True)
class Logps:
    """Summed log-probabilities of a batch's chosen and rejected replies (one entry per pair)
    and their reply token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def per_token(self) -> Logps:
        """The same replies' mean log-probability per token."""
        return Logps(
            self.chosen / self.chosen_tokens,
            self.rejected / self.rejected_tokens,
            self.chosen_tokens,
            self.rejected_tokens,
        )

    def swapped(self) -> Logps:
        return Logps(self.rejected, self.chosen, self.rejected_tokens, self.chosen_tokens)


@dataclass(frozen=True)
class PreferenceLoss:
    """losses: one per pair (KTO: per row), with gradients; figures: per pair, detached."""

    losses: torch.Tensor
    figures: dict[str, torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()


def _figures(chosen_reward, rejected_reward, policy: Logps) -> dict[str, torch.Tensor]:
    c, r = chosen_reward.detach(), rejected_reward.detach()
    mean = policy.per_token()
    return {
        "chosen_reward": c,
        "rejected_reward": r,
        "margin": c - r,
        "accuracy": (c > r).float(),
        "chosen_logp": mean.chosen.detach(),
        "rejected_logp": mean.rejected.detach(),
    }


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(z), with label smoothing eps: the labels are taken as flipped with
    probability eps (conservative DPO, cDPO)."""
    loss = -F.logsigmoid(z) * (1 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-z) * label_smoothing
    return loss


def _sft(policy: Logps) -> torch.Tensor:
    """Each chosen reply's mean token negative log-likelihood."""
    return -policy.chosen / policy.chosen_tokens


def dpo_loss(
    policy: Logps,
    reference: Logps,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> PreferenceLoss:
    """DPO and its variants over z = (policy - reference log-ratio of chosen) - (the same of
    rejected):

        sigmoid  -log sigmoid(beta z)              (DPO; label_smoothing > 0: cDPO)
        hinge    max(0, 1 - beta z)                 (RSO's hinge, with beta as TRL has it;
                                                     torchtune's RSOLoss names it gamma)
        ipo      (z - 1 / (2 beta))^2, beta = tau   on mean log-probs per token, as TRL
                                                     computes it (the IPO paper writes sums)

    sft_weight > 0 adds sft_weight x the chosen reply's mean token NLL (TRL's rpo_alpha, the
    remedy for falling chosen rewards); TRL's NLL is a token mean over the whole batch's chosen
    replies, ours a mean per reply, so that each pair's loss stands alone.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: expected one of {DPO_LOSS_TYPES}")
    pol, ref = policy, reference
    if loss_type == "ipo":
        pol, ref = policy.per_token(), reference.per_token()
    chosen_ratio, rejected_ratio = pol.chosen - ref.chosen, pol.rejected - ref.rejected
    z = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * z, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        losses = (z - 1 / (2 * beta)) ** 2
    if sft_weight:
        losses = losses + sft_weight * _sft(policy)
    return PreferenceLoss(losses, _figures(beta * chosen_ratio, beta * rejected_ratio, policy))


def simpo_loss(
    policy: Logps,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
) -> PreferenceLoss:
    """SimPO, no reference: -log sigmoid(beta (mean log-prob of chosen - of rejected) - gamma).

    gamma is the target margin itself, as in the paper and torchtune; TRL's CPOTrainer takes
    simpo_gamma the same way (it subtracts gamma / beta inside beta x (...)). Rewards are
    beta x mean log-prob. TRL's CPO adds an NLL term by default (cpo_alpha 1.0); ours is off
    unless sft_weight > 0 (the SimPO paper trains without it)."""
    mean = policy.per_token()
    losses = _smoothed_sigmoid(beta * (mean.chosen - mean.rejected) - gamma, label_smoothing)
    if sft_weight:
        losses = losses + sft_weight * _sft(policy)
    return PreferenceLoss(losses, _figures(beta * mean.chosen, beta * mean.rejected, policy))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2, and finite (x is clamped
    below -1e-6: a reply the model is certain of has odds log(1e-6), not -inf)."""
    x = x.clamp(max=-1e-6)
    near = x > -math.log(2)
    # each branch is evaluated on a harmless stand-in where it is not used, so that its
    # gradient there is 0, not NaN (torch.where passes 0 x inf = NaN otherwise)
    a = torch.log(-torch.expm1(torch.where(near, x, -1.0)))
    b = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(near, a, b)


def orpo_loss(policy: Logps, beta: float = 0.1) -> PreferenceLoss:
    """ORPO, no reference: the chosen reply's mean token NLL - beta x log sigmoid(log odds
    ratio), the odds of a reply being exp(m) / (1 - exp(m)) with m its mean token log-prob.

    TRL's NLL is a token mean over the whole batch's chosen replies, ours (as in the ORPO paper)
    a mean per reply; TRL computes log(1 - exp(m)) as log1p(-exp(m)), which is -inf when m
    reaches 0, where ours stays finite (_log1mexp). Rewards are beta x mean log-prob, as TRL's.
    The figures add log_odds."""
    mean = policy.per_token()
    log_odds = (mean.chosen - _log1mexp(mean.chosen)) - (mean.rejected - _log1mexp(mean.rejected))
    losses = _sft(policy) - beta * F.logsigmoid(log_odds)
    figures = _figures(beta * mean.chosen, beta * mean.rejected, policy)
    figures["log_odds"] = log_odds.detach()
    return PreferenceLoss(losses, figures)


def kl_partners(n: int) -> list[int]:
    """For KTO's KL estimate: row i's prompt is scored with row partners[i]'s completion, a
    completion written for another prompt (each row's completion moves one place along the
    batch, as TRL pairs them; a batch of one is paired with itself)."""
    return [(i - 1) % n for i in range(n)]


def kto_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of policy - reference summed log-probs of the
    mismatched (prompt, completion) rows of kl_partners, at least 0, without gradients (as in
    the KTO paper and TRL). With several processes, average it over all of them before
    kto_loss, as TRL does."""
    return (policy_logps - reference_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PreferenceLoss:
    """KTO over unpaired rows, r = policy - reference summed log-prob of each completion:

        desirable    desirable_weight x (1 - sigmoid(beta (r - kl)))
        undesirable  undesirable_weight x (1 - sigmoid(beta (kl - r)))

    The batch loss is the mean over all rows, as in TRL. Figures per row: reward (beta r),
    desirable (1.0 or 0.0) and kl; a log's chosen and rejected rewards are the mean reward of
    the desirable and of the undesirable rows, and their difference the margin (TRL logs the
    same)."""
    ratio = policy - reference
    good = desirable.bool()
    losses = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    figures = {
        "reward": (beta * ratio).detach(),
        "desirable": good.float(),
        "kl": torch.as_tensor(kl, dtype=ratio.dtype).detach().expand_as(ratio),
    }
    return PreferenceLoss(losses, figures)
