"""Each verifiable-constraint checker on replies that obey it and replies that do not."""

from __future__ import annotations

import pytest

from instill.data import builtin
from instill.data.constraints import KINDS, Constraint, check_all

C = Constraint.of

CASES = [
    # (constraint, obeying replies, violating replies)
    (C("lowercase"), ["paris", "  tokyo \n", "a, b and 3 cats!"], ["Paris", "PARIS", "123", ""]),
    (
        C("max_words", n=3),
        ["A red chair.", "one", "  two  words "],
        ["A red wooden chair.", "", "   ", "a b\nc d"],
    ),
    (
        C("json_keys", keys=["name", "city"]),
        ['{"city": "Rome", "name": "Ana"}', '```json\n{"name": 1, "city": null}\n```'],
        [
            '{"name": "Ana"}',
            '{"name": "Ana", "city": "Rome", "year": 1990}',
            'Sure: {"name": "Ana", "city": "Rome"}',
            '["name", "city"]',
            "{name: Ana, city: Rome}",
        ],
    ),
    (
        C("bullets", n=2),
        ["- apple\n- chair", "* apple\n* chair\n", "- apple\n\n- chair"],
        [
            "- apple",
            "- apple\n- chair\n- river",
            "apple\nchair",
            "- apple\nchair",
            "-apple\n-chair",
            "- \n- chair",
        ],
    ),
    (
        C("include_word", word="warm"),
        ["The teapot is warm.", "WARM tea", "warm"],
        ["The teapot is warmer.", "lukewarm", "The teapot is hot."],
    ),
    (
        C("avoid_word", word="red"),
        ["Tom likes the camera.", "Fred bought a bred horse", "reddish"],
        ["Tom likes the red camera.", "RED", "red-hot", ""],
    ),
    (
        C("end_with", phrase="Best wishes."),
        ["Ana, the cake is ready. Best wishes.", "Best wishes.\n"],
        ["Best wishes", "Ana, best wishes.", "Best wishes. Bye.", ""],
    ),
]


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[c[0].kind for c in CASES])
def test_checker(constraint, good, bad):
    for reply in good:
        assert constraint.check(reply), (constraint, reply)
    for reply in bad:
        assert not constraint.check(reply), (constraint, reply)


def test_every_kind_has_cases_and_an_instruction():
    assert {c.kind for c, _, _ in CASES} == set(KINDS)
    assert C("max_words", n=5).instruction() == "Use at most 5 words."
    assert C("json_keys", keys=["a", "b"]).instruction() == (
        'Answer with a JSON object with exactly the keys "a", "b".'
    )
    assert C("end_with", phrase="Bye.").name() == "end_with(phrase='Bye.')"


def test_bad_constraints_name_what_is_valid():
    with pytest.raises(ValueError, match="lowercase"):
        C("lower")
    with pytest.raises(ValueError, match=r"\['n'\]"):
        C("max_words", words=3)


def test_check_all_reports_each():
    checks = (C("bullets", n=2), C("lowercase"))
    assert check_all(checks, "- a\n- B") == {"bullets(n=2)": True, "lowercase": False}


def test_builtin_constraint_examples_scored_strictly():
    exs = builtin.generate("eval", 6, families=builtin.clusters()["constraints"])
    assert {e.scorer for e in exs} == {"constraints"} and all(e.constraints for e in exs)
    for ex in exs:  # the reference obeys its constraints; a verbose or empty reply does not
        assert builtin.score(ex, ex.reference, ex.reference) == 1.0
        assert builtin.score(ex, "", ex.reference) == 0.0
    both = next(e for e in exs if e.family == "lowercase_bullets")
    assert builtin.score(both, both.reference.upper(), both.reference) == 0.0  # one of two fails
    assert builtin.score(both, both.reference + "\n- extra", both.reference) == 0.0
    end = next(e for e in exs if e.family == "end_phrase")
    assert builtin.score(end, end.reference + " Bye.", end.reference) == 0.0
    with pytest.raises(ValueError, match="Example"):
        builtin.score("constraints", "x", "x")
