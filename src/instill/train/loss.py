"""Cross-entropy on supervised positions only.

The decoder runs over every token, but the output projection (49k x 576 for SmolLM2, a fifth of
the model's compute per token) and the softmax run only where a label exists, in chunks, so the
full-vocabulary logits of prompt tokens are never materialised. The module returns the loss *sum*
and the token count; the loop divides by the token count of the whole accumulated (and, with
several processes, global) batch, which makes batch 8 equal batch 2 x 4 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _ce_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None
):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


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
    n = hidden.shape[0]
    if n <= chunk:
        return _ce_sum(head, hidden, targets, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + checkpoint(
            _ce_sum,
            head,
            hidden[i : i + chunk],
            targets[i : i + chunk],
            softcap,
            use_reentrant=False,
        )
    return total


class SupervisedLM(torch.nn.Module):
    """Wraps a causal LM (plain or peft) so that forward returns (loss sum, supervised tokens).

    This is our own module, not a patched `forward`: accelerate wraps *it* for DDP/FSDP, so
    gradient synchronisation sees the whole computation.
    """

    def __init__(self, model: torch.nn.Module, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def _base(self) -> torch.nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        base = self._base()
        body = getattr(base, base.base_model_prefix)
        head = base.get_output_embeddings()
        hidden = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        softcap = getattr(base.config, "final_logit_softcapping", None)
        loss_sum = chunked_cross_entropy(
            head, hidden[:, :-1][keep], targets[keep], self.chunk, softcap
        )
        return loss_sum, keep.sum()
