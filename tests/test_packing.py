"""Packing: best fit, and a packed batch gives exactly the per-token losses of each row alone."""

import torch
import torch.nn.functional as F
from test_loss import make_rows

from instill.data.packing import collate_packed, pack_best_fit, packing_efficiency


def per_token_losses(model, input_ids, labels, position_ids=None, attention_mask=None):
    # use_cache=False matters: transformers only derives the block-diagonal mask from position
    # ids when no cache is passed (the training loop never passes one).
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        ).logits
    targets = labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="none")


def alone(model, rows, order):
    out = []
    for i in order:
        ids = torch.tensor([rows[i].input_ids])
        labels = torch.where(torch.tensor([rows[i].mask], dtype=torch.bool), ids, -100)
        out.append(per_token_losses(model, ids, labels))
    return torch.cat(out)


def test_best_fit_places_every_row_once_within_length():
    rows = make_rows(40, seed=1)
    bins = pack_best_fit(rows, 64)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(40))
    assert all(sum(len(rows[i].input_ids) for i in b) <= 64 for b in bins)
    total = sum(len(r.input_ids) for r in rows)
    assert len(bins) <= -(-total // 64) + 2  # close to the lower bound
    assert packing_efficiency(rows, bins, 64) > 0.85


def test_packed_equals_each_row_alone(tiny):
    rows = make_rows(10, seed=2)
    bins = pack_best_fit(rows, 96)
    batch = collate_packed(rows, bins, pad_id=2)
    packed = per_token_losses(tiny, batch["input_ids"], batch["labels"], batch["position_ids"])
    reference = alone(tiny, rows, [i for b in bins for i in b])
    assert packed.shape == reference.shape
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)


def test_negative_control_attention_across_rows_changes_losses(tiny):
    rows = make_rows(10, seed=2)
    bins = pack_best_fit(rows, 96)
    batch = collate_packed(rows, bins, pad_id=2)
    width = batch["input_ids"].shape[1]
    running = torch.arange(width).expand_as(batch["input_ids"])  # positions never restart
    crossed = per_token_losses(tiny, batch["input_ids"], batch["labels"], running)
    reference = alone(tiny, rows, [i for b in bins for i in b])
    assert (crossed - reference).abs().max() > 1e-3


def test_training_with_packing_runs_and_counts_real_tokens(tiny, tokenizer):
    from instill.config import AdapterConfig, TrainConfig
    from instill.models import attach_adapter
    from instill.train import train

    rows = make_rows(12, seed=3)
    model, _ = attach_adapter(tiny, AdapterConfig(method="full"))
    result = train(
        model, tokenizer, rows, TrainConfig(epochs=1, batch_size=2, lr=1e-2), None, pack_length=128
    )
    bins = pack_best_fit(rows, 128)
    assert result.steps == -(-len(bins) // 2)
    assert result.tokens == sum(len(r.input_ids) for r in rows)  # one epoch, no padding counted


def test_row_longer_than_packing_length_is_a_named_error():
    import pytest

    from instill.config import TrainConfig
    from instill.errors import InstillError
    from instill.train.loop import Batcher

    rows = make_rows(10, seed=3)
    longest = max(len(r.input_ids) for r in rows)
    i = max(range(10), key=lambda k: len(rows[k].input_ids))
    with pytest.raises(InstillError, match=rf"row {i} has {longest} tokens .*data\.max_length"):
        Batcher(rows, TrainConfig(batch_size=2), pad_id=2, pack_length=longest - 1)
    # negative control: at the longest row's length every row fits
    assert Batcher(rows, TrainConfig(batch_size=2), pad_id=2, pack_length=longest).per_epoch > 0
