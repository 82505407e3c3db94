"""The loss: supervised positions only, chunked, and normalised across accumulation."""

import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from instill.data.dataset import Row, collate
from instill.train.loop import accumulate
from instill.train.loss import SupervisedLM


def make_rows(n=8, seed=0, vocab=49152):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(6, 40)  # rows of different lengths
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        start = rng.randint(2, length - 2)
        mask = [0] * start + [1] * (length - start)
        rows.append(Row(ids, mask, "test"))
    return rows


def reference_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed token loss through the model's own forward (full-vocabulary logits): the check."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "real_tokens"}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_supervised_loss_equals_full_logits_loss(tiny):
    batch = collate(make_rows(4), pad_id=2)
    loss_sum, n = SupervisedLM(tiny)(**inputs(batch))
    expected = reference_loss(tiny, batch)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)


def test_chunked_equals_unchunked_in_value_and_gradient(tiny):
    batch = collate(make_rows(4), pad_id=2)
    whole, _ = SupervisedLM(tiny, chunk=10_000)(**inputs(batch))
    whole.backward()
    g1 = grads(tiny)
    tiny.zero_grad()
    chunked, _ = SupervisedLM(tiny, chunk=7)(**inputs(batch))
    chunked.backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    for name, g in grads(tiny).items():
        torch.testing.assert_close(g, g1[name], rtol=1e-4, atol=5e-5)  # summation order


def _accumulated_grads(model, rows, micro_size):
    model.zero_grad()
    acc = Accelerator(cpu=True)
    micro = [collate(rows[i : i + micro_size], pad_id=2) for i in range(0, len(rows), micro_size)]
    loss, tokens, _ = accumulate(acc, SupervisedLM(model), micro)
    return loss, tokens, grads(model)


def test_batch_8_equals_batch_2_times_4_accumulation(tiny):
    rows = make_rows(8)
    loss8, tok8, g8 = _accumulated_grads(tiny, rows, 8)
    loss2, tok2, g2 = _accumulated_grads(tiny, rows, 2)
    assert tok8 == tok2
    assert loss2 == pytest.approx(loss8, abs=1e-5)
    for name in g8:
        torch.testing.assert_close(g2[name], g8[name], rtol=1e-5, atol=1e-5)


def test_negative_control_per_micro_batch_mean_differs(tiny):
    """Averaging each micro-batch's mean loss (what a naive loop does) weights tokens unequally."""
    rows = make_rows(8)
    _, _, g8 = _accumulated_grads(tiny, rows, 8)
    tiny.zero_grad()
    model = SupervisedLM(tiny)
    for i in range(0, 8, 2):
        loss_sum, n = model(**inputs(collate(rows[i : i + 2], pad_id=2)))
        (loss_sum / n / 4).backward()
    naive = grads(tiny)
    worst = max(float((naive[k] - g8[k]).abs().max()) for k in g8)
    assert worst > 1e-4


def test_evaluation_likelihood_is_the_training_loss(tiny):
    """One supervised loss: evaluation's per-row log-probabilities (eval/likelihood.py) come from
    the same function as training's validation loss, so they agree: the mean of their negatives
    over all scored tokens is the validation loss, and each row's score is the negative of its
    own training loss. Negative control: one mask position moved changes the score."""
    from instill.eval.likelihood import masked_logprobs, perplexity
    from instill.train.loop import validation_loss

    rows = make_rows(6, seed=3)
    scores = masked_logprobs(tiny, [(r.input_ids, r.mask) for r in rows], 0, batch_size=4)
    loss, _ = perplexity(scores)
    assert loss == pytest.approx(validation_loss(tiny, rows, 2, 0), rel=1e-6)
    with torch.no_grad():
        for row, score in zip(rows, scores, strict=True):
            loss_sum, tokens = SupervisedLM(tiny)(**inputs(collate([row], 0)))
            assert score.tokens == int(tokens) == sum(row.mask[1:])
            assert score.logprob == pytest.approx(-float(loss_sum), rel=1e-6)
    shifted = [0] + rows[0].mask[:-1]  # the reply starts one token later
    (moved,) = masked_logprobs(tiny, [(rows[0].input_ids, shifted)], 0)
    assert moved.tokens == scores[0].tokens - 1 and moved.logprob != scores[0].logprob


def _masks_seen(model, batch) -> list:
    """The attention_mask each call of the decoder body received during one SupervisedLM
    forward of `batch`."""
    seen = []
    body = model.model
    hook = body.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    try:
        loss, _ = SupervisedLM(model)(**inputs(batch))
    finally:
        hook.remove()
    return seen, loss


def test_right_padded_batches_drop_the_mask_and_keep_every_real_tokens_loss(tiny):
    """A right-padded batch runs under causal attention alone (the kernels skip the cells
    above the diagonal): the body gets no mask, and the loss and gradients are the masked
    model's."""
    from instill.train.loss import causal_suffices

    batch = collate(make_rows(4), pad_id=2)
    assert (batch["attention_mask"] == 0).any()  # there is padding to drop
    seen, loss = _masks_seen(tiny, batch)
    assert seen == [None]
    loss.backward()
    g1 = grads(tiny)
    tiny.zero_grad()
    expected = reference_loss(tiny, batch)  # the model's own forward, with the mask
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for name, g in grads(tiny).items():
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=1e-6)
    tiny.zero_grad()

    # left padding, a hole inside a row, or position ids of its own: the mask stays
    left = batch["attention_mask"].flip(1)
    assert not causal_suffices(left, None)
    hole = torch.ones(2, 6, dtype=torch.long)
    hole[1, 2] = 0
    assert not causal_suffices(hole, None)
    assert not causal_suffices(batch["attention_mask"], torch.arange(batch["input_ids"].shape[1]))
    assert causal_suffices(batch["attention_mask"], None)
    flipped = {**batch, "attention_mask": left, "input_ids": batch["input_ids"].flip(1)}
    flipped["labels"] = batch["labels"].flip(1)
    seen, _ = _masks_seen(tiny, flipped)
    assert seen[0] is left


def test_chunked_loss_recomputes_every_chunk_but_the_last(tiny):
    """With k chunks the output head runs k times in forward and k - 1 in backward: the last
    chunk, which backward starts with, keeps its logits instead of recomputing them. The loss
    and gradients stay the unchunked ones (test above)."""
    batch = collate(make_rows(4), pad_id=2)
    n = int((batch["labels"][:, 1:] != -100).sum())
    chunk = 7
    k = -(-n // chunk)
    assert k >= 3
    calls = []
    hook = tiny.lm_head.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    try:
        loss, _ = SupervisedLM(tiny, chunk=chunk)(**inputs(batch))
        assert len(calls) == k and calls[-1] == chunk  # the first chunk takes the remainder
        loss.backward()
    finally:
        hook.remove()
        tiny.zero_grad()
    assert len(calls) == 2 * k - 1
    assert calls[k:] == calls[: k - 1][::-1]  # backward recomputes the others, last first
