"""report.claims: the claims both reports state, with one rule for a gain and one definition of
cost."""

from __future__ import annotations

import pytest

from instill.eval.compare import Row
from instill.report.claims import (
    device_cost,
    gain_verdict,
    performance_verdict,
    training_costs,
    transfer_answers_claim,
    transfer_cost_claim,
    transfer_training_claim,
)


def _row(delta, ci, label="overall", a=0.5):
    return Row(label, a, a + delta, 10, 10, delta, ci, True)


def _table(suite, delta, ci):
    return {"suite": suite, "metric": "exact_match", "rows": [_row(delta, ci)]}


def test_device_cost_is_hours_times_price():
    assert device_cost(7200, 0.5) == 1.0
    assert device_cost(0, 9.0) == 0.0


def test_a_gain_needs_every_interval_above_zero():
    up, flat, down = _row(0.2, (0.1, 0.3)), _row(0.2, (-0.1, 0.5)), _row(-0.2, (-0.3, -0.1))
    assert gain_verdict("c", [("x", up), ("y", up)]).supported is True
    # negative controls: one interval touching 0, or a significant loss, is not a gain
    assert gain_verdict("c", [("x", up), ("y", flat)]).supported is False
    assert gain_verdict("c", [("x", down)]).supported is False
    v = gain_verdict("c", [("x", flat)], "Not shown.")
    assert v.text == "x. Not shown."
    assert gain_verdict("c", [("x", up)], "Not shown.").text == "x."
    # a significant loss is called one, not "not distinguishable from zero"
    lost = gain_verdict("c", [("x", up), ("y", down)], "Not distinguishable from zero.")
    assert lost.supported is False
    assert lost.text == "x; y. A loss, not a gain: a 95% interval above lies wholly below 0."


def test_run_and_transfer_reports_judge_answers_by_the_same_rule():
    for delta, ci, want in ((0.2, (0.1, 0.3), True), (0.2, (-0.1, 0.5), False)):
        run = performance_verdict([_table("builtin", delta, ci)])
        t = _table("builtin", delta, ci)
        transfer = transfer_answers_claim(["builtin"], {"builtin": t}, {"builtin": t})
        assert run.supported is want and transfer.supported is want
    assert transfer_answers_claim([], {}, {}).supported is None


def test_transfer_costs_price_training_time_with_the_one_definition():
    run = {
        "wall_s": 900.0,  # the whole run, evaluation included: not what the starts differ in
        "train": {"wall_s": 360.0, "tokens": 1000, "steps": 5, "peak_mem_mb": 10.0},
        "params": {"total": 100, "trainable": 10},
    }
    costs = training_costs(run, 2.0)
    assert costs["cost"] == device_cost(360.0, 2.0) == pytest.approx(0.2)
    assert costs["flops"] == 1000 * (4 * 100 + 2 * 10)
    cheap = {**costs, "flops": costs["flops"] / 2}
    assert transfer_cost_claim(cheap, costs, None, 2.0).supported is True
    assert transfer_cost_claim(costs, cheap, None, 2.0).supported is False
    # reaching the scratch model's best loss sooner decides it, priced the same way
    saved = {"pretrained_reached": (1, 10, 36.0, 1.0), "scratch_best": (5, 50, 180.0, 1.0)}
    claim = transfer_cost_claim(costs, cheap, saved, 2.0)
    assert claim.supported is True
    assert f"{device_cost(36.0, 2.0):.4f} USD from the pretrained start" in claim.text


def test_transfer_cost_states_its_basis_and_currency():
    """Issue 29: 376 s against 388 s compared the cost of unequal work (92 steps against 83).
    Equal work is said to be equal; unequal work is compared per million training tokens."""

    def costs(seconds, tokens, steps, trainable=10):
        run = {
            "wall_s": 1.0,
            "train": {"wall_s": seconds, "tokens": tokens, "steps": steps, "peak_mem_mb": 1.0},
            "params": {"total": 100, "trainable": trainable},
        }
        return training_costs(run, 3.6)

    assert costs(360.0, 1000, 5)["cost_per_mtok"] == pytest.approx(0.36 / 1000 * 1e6)
    equal = transfer_cost_claim(costs(100.0, 1000, 5), costs(200.0, 1000, 5, 100), None, 3.6)
    assert equal.supported is True
    assert "equal work (5 steps, 1,000 training tokens each)" in equal.text
    assert "0.1000 USD (pretrained start" in equal.text and "3.6 USD per device-hour" in equal.text
    # the pretrained start trained twice the tokens: more in all, less per token
    unequal = transfer_cost_claim(costs(300.0, 2000, 10), costs(200.0, 1000, 5, 100), None, 3.6)
    assert "unequal work (10 steps, 2,000 training tokens vs 5 steps, 1,000)" in unequal.text
    assert "per million training tokens: 150.0000 USD vs 200.0000 USD" in unequal.text
    assert unequal.supported is True
    worse = transfer_cost_claim(costs(300.0, 2000, 10, 100), costs(100.0, 1000, 5), None, 3.6)
    assert worse.supported is False


def test_training_claim_states_what_was_saved():
    assert transfer_training_claim(None).supported is None
    never = {"scratch_best": (5, 50, 10.0, 1.5), "pretrained_reached": None}
    assert transfer_training_claim(never).supported is False
    saved = {
        "scratch_best": (5, 50, 10.0, 1.5),
        "pretrained_reached": (2, 20, 4.0, 1.4),
        "steps_saved": 3,
        "tokens_saved": 30,
        "seconds_saved": 6.0,
    }
    claim = transfer_training_claim(saved)
    assert claim.supported is True
    assert "**3 steps, 30 tokens and 6 s of training saved**" in claim.text
