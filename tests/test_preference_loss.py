"""Preference losses against values worked out by hand, their invariants, and the per-sequence
log-probabilities they are computed from."""

import math

import pytest
import torch

from instill.data.dataset import labels_from, pad_right
from instill.data.preference import Pair
from instill.data.preference_tokens import tokenize_preferences
from instill.train.preference import (
    Logps,
    _log1mexp,
    dpo_loss,
    kl_partners,
    kto_kl,
    kto_loss,
    model_logps,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

# one pair: policy chosen -10 over 5 tokens, rejected -12 over 4; reference -11 and -11
POLICY = Logps(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([5]), torch.tensor([4]))
REFERENCE = Logps(
    torch.tensor([-11.0]), torch.tensor([-11.0]), torch.tensor([5]), torch.tensor([4])
)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def close(tensor, value):
    assert float(tensor.detach()) == pytest.approx(value, rel=1e-6, abs=1e-7)


def test_dpo_sigmoid_by_hand():
    # z = (-10 - -11) - (-12 - -11) = 2; loss = -log sigmoid(0.1 * 2)
    out = dpo_loss(POLICY, REFERENCE, beta=0.1)
    close(out.loss, softplus(-0.2))
    f = out.figures
    close(f["chosen_reward"], 0.1)
    close(f["rejected_reward"], -0.1)
    close(f["margin"], 0.2)
    close(f["accuracy"], 1.0)
    close(f["chosen_logp"], -2.0)
    close(f["rejected_logp"], -3.0)


def test_dpo_label_smoothing_and_sft_term_by_hand():
    out = dpo_loss(POLICY, REFERENCE, beta=0.1, label_smoothing=0.1)
    close(out.loss, 0.9 * softplus(-0.2) + 0.1 * softplus(0.2))
    # the supervised term: the chosen reply's mean token NLL, 10 / 5
    out = dpo_loss(POLICY, REFERENCE, beta=0.1, sft_weight=0.5)
    close(out.loss, softplus(-0.2) + 0.5 * 2.0)


def test_ipo_and_hinge_by_hand():
    # IPO on mean log-probs per token: (-2 - -2.2) - (-3 - -2.75) = 0.45; (0.45 - 1/0.2)^2
    out = dpo_loss(POLICY, REFERENCE, beta=0.1, loss_type="ipo")
    close(out.loss, (0.45 - 5.0) ** 2)
    close(out.figures["margin"], 0.1 * 0.45)
    close(dpo_loss(POLICY, REFERENCE, beta=0.1, loss_type="hinge").loss, 1 - 0.1 * 2)
    close(dpo_loss(POLICY, REFERENCE, beta=1.0, loss_type="hinge").loss, 0.0)
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        dpo_loss(POLICY, REFERENCE, loss_type="kto")


def test_simpo_by_hand():
    # mean log-probs -2 and -3: -log sigmoid(2.0 * (-2 - -3) - 0.5)
    out = simpo_loss(POLICY, beta=2.0, gamma=0.5)
    close(out.loss, softplus(-1.5))
    close(out.figures["chosen_reward"], -4.0)
    close(out.figures["rejected_reward"], -6.0)
    close(out.figures["margin"], 2.0)


def test_orpo_by_hand():
    # odds of a reply: p / (1 - p) with p = e^(mean log-prob)
    log_odds = (-2 - math.log(1 - math.exp(-2))) - (-3 - math.log(1 - math.exp(-3)))
    out = orpo_loss(POLICY, beta=0.1)
    close(out.loss, 2.0 + 0.1 * softplus(-log_odds))
    close(out.figures["log_odds"], log_odds)
    close(out.figures["chosen_reward"], -0.2)


def test_kto_by_hand():
    policy, reference = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
    desirable = torch.tensor([True, False])
    out = kto_loss(policy, reference, desirable, kl=0.5, beta=0.1, undesirable_weight=2.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # desirable: 1 - sigmoid(0.1 (1 - 0.5)); undesirable: 2 (1 - sigmoid(0.1 (0.5 - -1)))
    expected = [1 - sig(0.05), 2 * (1 - sig(0.15))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    close(out.loss, sum(expected) / 2)
    assert out.figures["reward"].tolist() == pytest.approx([0.1, -0.1])
    assert out.figures["desirable"].tolist() == [1.0, 0.0]
    assert out.figures["kl"].tolist() == [0.5, 0.5]


def test_kto_kl_estimate_on_mismatched_rows():
    assert kl_partners(3) == [2, 0, 1] and kl_partners(1) == [0]
    # a mean log-ratio of (1 + -1) / 2 = 0; of 1; a negative one is clamped to 0
    close(kto_kl(torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.0])), 0.0)
    close(kto_kl(torch.tensor([-5.0, -5.0]), torch.tensor([-6.0, -6.0])), 1.0)
    close(kto_kl(torch.tensor([-7.0, -7.0]), torch.tensor([-6.0, -6.0])), 0.0)
    grad = torch.tensor([-5.0], requires_grad=True)
    assert not kto_kl(grad, torch.tensor([-6.0])).requires_grad


def test_dpo_is_log_2_with_zero_margins_when_policy_equals_reference():
    torch.manual_seed(0)
    logps = Logps(
        -10 * torch.rand(8), -10 * torch.rand(8), torch.full((8,), 3), torch.full((8,), 4)
    )
    out = dpo_loss(logps, logps, beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2)] * 8)
    assert out.figures["margin"].tolist() == [0.0] * 8
    assert out.figures["accuracy"].tolist() == [0.0] * 8  # a tie is not a win


def _random_logps(seed):
    g = torch.Generator().manual_seed(seed)
    sums = -20 * torch.rand(2, 6, generator=g)
    tokens = torch.randint(1, 10, (2, 6), generator=g)
    return Logps(sums[0], sums[1], tokens[0], tokens[1])


@pytest.mark.parametrize(
    "loss",
    [
        lambda p, r: dpo_loss(p, r),
        lambda p, r: dpo_loss(p, r, loss_type="ipo"),
        lambda p, r: dpo_loss(p, r, loss_type="hinge"),
        lambda p, r: simpo_loss(p),
        lambda p, r: orpo_loss(p),
    ],
    ids=["dpo", "ipo", "hinge", "simpo", "orpo"],
)
def test_swapping_chosen_and_rejected_flips_every_margin(loss):
    policy, reference = _random_logps(1), _random_logps(2)
    a = loss(policy, reference).figures
    b = loss(policy.swapped(), reference.swapped()).figures
    assert (a["margin"] != 0).all()
    assert b["margin"].tolist() == pytest.approx((-a["margin"]).tolist())
    assert b["chosen_reward"].tolist() == pytest.approx(a["rejected_reward"].tolist())
    assert (a["accuracy"] + b["accuracy"]).tolist() == [1.0] * 6


@pytest.mark.parametrize(
    "loss",
    [
        lambda p, r: dpo_loss(p, r, sft_weight=1.0),
        lambda p, r: dpo_loss(p, r, loss_type="ipo"),
        lambda p, r: dpo_loss(p, r, loss_type="hinge", beta=0.01),
        lambda p, r: simpo_loss(p, sft_weight=1.0),
        lambda p, r: orpo_loss(p),
        lambda p, r: kto_loss(p.chosen, r.chosen, torch.tensor([1, 0] * 3), kl=0.2),
    ],
    ids=["dpo", "ipo", "hinge", "simpo", "orpo", "kto"],
)
def test_gradients_are_finite(loss):
    chosen = torch.tensor([-10.0, -1e-9, 0.0, -300.0, -2.0, -5.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -4.0, -1e-9, -0.5, -2.0, -700.0], requires_grad=True)
    tokens = torch.tensor([5, 1, 1, 3, 2, 9])
    policy = Logps(chosen, rejected, tokens, tokens.flip(0))
    reference = Logps(chosen.detach() + 1, rejected.detach() - 1, tokens, tokens.flip(0))
    out = loss(policy, reference)
    out.loss.backward()
    assert torch.isfinite(out.losses).all()
    used = [t.grad for t in (chosen, rejected) if t.grad is not None]  # KTO: chosen only
    assert all(torch.isfinite(g).all() for g in used)
    assert chosen.grad.abs().sum() > 0


def test_log1mexp_is_accurate_and_finite_at_certainty():
    x = torch.tensor([-1e-3, -0.5, -0.7, -2.0, -50.0, 0.0], dtype=torch.float64)
    x.requires_grad_(True)
    y = _log1mexp(x)
    expected = [math.log(1 - math.exp(v)) for v in [-1e-3, -0.5, -0.7, -2.0, -50.0]]
    assert y[:5].tolist() == pytest.approx(expected, rel=1e-12)
    close(y[5], math.log(-math.expm1(-1e-6)))  # clamped, not -inf
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def _pair_batch(tokenizer):
    pair = Pair(
        ({"role": "user", "content": "Add 2 and 3."},),
        ({"role": "assistant", "content": "5"},),
        ({"role": "assistant", "content": "It is 6."},),
        "f:1",
    )
    (row,), _ = tokenize_preferences(tokenizer, [pair], 256)
    ids, attn, mask = pad_right([row.chosen(), row.rejected()], tokenizer.pad_token_id)
    return row, ids, attn, labels_from(ids, mask)


def _oracle(logits, labels):
    """Each row's summed log-prob of its labelled tokens, from the full logits."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(dim=1), keep.sum(dim=1)


def test_sequence_logps_scores_only_the_replies(tokenizer):
    row, ids, _, labels = _pair_batch(tokenizer)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, len(tokenizer), bias=False)
    hidden = torch.randn(2, ids.shape[1], 8, requires_grad=True)
    sums, tokens = sequence_logps(head, hidden, labels)
    want, want_tokens = _oracle(head(hidden), labels)
    assert sums.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    assert tokens.tolist() == want_tokens.tolist() == [2, 6]  # "5"+end, "It is 6."+end
    # chunked (each chunk recomputed in backward) equals one piece
    assert sequence_logps(head, hidden, labels, chunk=3)[0].tolist() == pytest.approx(
        sums.tolist(), rel=1e-6
    )
    # the prompt carries no loss: other logits at prompt positions leave the sums unchanged...
    p = len(row.prompt_ids)
    changed = hidden.detach().clone()
    changed[:, : p - 1] += 5 * torch.randn(2, p - 1, 8)
    assert sequence_logps(head, changed, labels)[0].tolist() == sums.tolist()
    # ...while the last prompt position, which predicts the reply's first token, counts
    changed[:, p - 1] += 1.0
    assert sequence_logps(head, changed, labels)[0].tolist() != pytest.approx(sums.tolist())
    sums.sum().backward()
    assert hidden.grad[:, : p - 1].abs().sum() == 0 and hidden.grad[:, p - 1].abs().sum() > 0


def test_model_logps_equals_the_models_own_logits_and_trains(tiny, tokenizer):
    _, ids, attn, labels = _pair_batch(tokenizer)
    sums, tokens = model_logps(tiny, ids, labels, attn)
    with torch.no_grad():
        want, _ = _oracle(tiny(input_ids=ids, attention_mask=attn).logits, labels)
    assert sums.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    logps = Logps(sums[:1], sums[1:], tokens[:1], tokens[1:])
    out = dpo_loss(logps, Logps(*(t.detach() for t in (sums[:1], sums[1:])), tokens[:1],
                                tokens[1:]))  # fmt: skip
    close(out.loss, math.log(2))
    out.loss.backward()
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
