"""Each metric on hand-worked examples."""

from __future__ import annotations

import pytest

from instill.eval.metrics import (
    bootstrap_ci,
    bootstrap_delta_ci,
    contains,
    exact_match,
    normalize,
    rouge_l,
    text_scores,
    token_f1,
)


def test_normalize_documented_rules():
    assert normalize('  "Paris."  ') == "paris"
    assert normalize("`42`!") == "42"
    assert normalize("New   York\nCity?") == "new york city"
    assert normalize("3.5") == "3.5"  # only trailing sentence punctuation goes


def test_exact_match():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("The answer is Paris", "Paris") == 0.0
    assert exact_match("", "") == 1.0


def test_contains_whole_words_only():
    assert contains("The answer is Paris.", "paris") == 1.0
    assert contains("Parisian food", "Paris") == 0.0  # not a word of the prediction
    assert contains("12 apples", "2") == 0.0
    assert contains("It is 2.", "2") == 1.0


def test_token_f1_hand_worked():
    # pred tokens: the cat sat ; ref tokens: the cat is here -> common 2
    # precision 2/3, recall 2/4 -> f1 = 2*(2/3)*(1/2)/((2/3)+(1/2)) = 4/7
    assert token_f1("The cat sat.", "the cat is here") == pytest.approx(4 / 7)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap: a, b
    assert token_f1("", "") == 1.0
    assert token_f1("x", "") == 0.0
    assert token_f1("dog", "cat") == 0.0


def test_rouge_l_hand_worked():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is 5 of 6 words each side
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS("a b c d", "a c b d") = 3 (a b d or a c d): P = R = 3/4
    assert rouge_l("a c b d", "a b c d") == pytest.approx(0.75)
    assert rouge_l("", "") == 1.0
    assert rouge_l("something", "") == 0.0


def test_text_scores_take_the_best_reference():
    s = text_scores("NYC", ["New York", "nyc"])
    assert s["exact_match"] == 1.0 and s["contains"] == 1.0
    assert set(s) == {"exact_match", "contains", "token_f1", "rouge_l"}
    assert all(isinstance(v, float) for v in s.values())


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    scores = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(scores)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bootstrap_ci(scores) == (lo, hi)
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0)


def test_paired_delta_interval_is_tighter_than_unpaired():
    a = [float(i % 2) for i in range(100)]
    b = [1.0 if i % 2 or i % 10 == 0 else 0.0 for i in range(100)]  # 10 more right, none lost
    lo_p, hi_p = bootstrap_delta_ci(a, b, paired=True)
    lo_u, hi_u = bootstrap_delta_ci(a, b, paired=False)
    assert 0 < lo_p <= 0.1 <= hi_p  # paired: every change is a gain, so 0 is excluded
    assert lo_u < 0  # unpaired cannot tell
    assert hi_p - lo_p < hi_u - lo_u
    with pytest.raises(ValueError):
        bootstrap_delta_ci([1.0], [1.0, 0.0], paired=True)
