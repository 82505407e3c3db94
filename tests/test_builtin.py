import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from instill.data.builtin import (
    CONSTRAINTS,
    FAMILIES,
    Example,
    clusters,
    generate,
    normalize,
    score,
)
from instill.data.constraints import check_all


def _prompt(ex: Example) -> str:
    return ex.messages[0]["content"]


def test_interface_shape():
    ex = generate("eval", 1, families=["addition"])[0]
    assert ex.messages[0]["role"] == "user" and ex.messages[1]["role"] == "assistant"
    assert ex.reference == ex.messages[1]["content"]
    assert ex.prompt_messages == [ex.messages[0]]
    assert (ex.family, ex.cluster, ex.scorer) == ("addition", "arithmetic", "exact")


def test_enough_families_and_clusters():
    assert len(FAMILIES) >= 20
    assert len(clusters()) >= 5 and all(len(f) >= 1 for f in clusters().values())
    assert sorted(sum(clusters().values(), [])) == sorted(FAMILIES)
    assert {f.scorer for f in FAMILIES.values()} == {"exact", "json", "constraints"}


def test_deterministic_in_process():
    assert generate("train", 20, seed=3) == generate("train", 20, seed=3)
    assert generate("train", 20, seed=3) != generate("train", 20, seed=4)


def test_deterministic_across_processes():
    code = (
        "import json; from instill.data.builtin import generate; "
        "print(json.dumps([e.messages for e in generate('eval', 5, seed=7)]))"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": src, "PYTHONHASHSEED": str(salt)},
        ).stdout
        for salt in (1, 2)
    ]
    assert outs[0] == outs[1]
    assert json.loads(outs[0]) == [list(e.messages) for e in generate("eval", 5, seed=7)]


@pytest.mark.parametrize("seed", [0, 1])
def test_train_eval_disjoint_and_unique(seed):
    train = generate("train", 200, seed=seed)
    eval_ = generate("eval", 60, seed=seed)
    train_prompts = [_prompt(e) for e in train]
    eval_prompts = [_prompt(e) for e in eval_]
    assert len(set(train_prompts)) == len(train_prompts)
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(train_prompts) & set(eval_prompts)


def test_counts_per_family_and_subset():
    exs = generate("train", 7)
    assert Counter(e.family for e in exs) == {name: 7 for name in FAMILIES}
    sub = generate("eval", 3, families=["sentiment", "addition"])
    assert [e.family for e in sub] == ["sentiment"] * 3 + ["addition"] * 3
    assert generate("eval", 0) == []


def test_invalid_arguments():
    with pytest.raises(ValueError, match="train"):
        generate("test", 1)
    with pytest.raises(ValueError, match="addition"):
        generate("train", 1, families=["nope"])


def test_impossible_request_raises():
    # sentiment has far fewer than 100k distinct eval prompts
    with pytest.raises(ValueError, match="sentiment"):
        generate("eval", 100_000, families=["sentiment"])


def test_phrasings_all_used():
    exs = generate("train", 200)
    for name, fam in FAMILIES.items():
        assert len(set(fam.phrasings)) >= 8, name
        prompts = [_prompt(e) for e in exs if e.family == name]
        for phrasing in fam.phrasings:
            pattern = re.escape(phrasing)
            pattern = re.sub(r"\\\{\w+\\\}", ".+", pattern)
            assert any(re.fullmatch(pattern, p, re.DOTALL) for p in prompts), (name, phrasing)


def _nums(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",")]


def _check(name: str, fields: dict, answer: str) -> None:
    if name == "addition":
        assert 1 <= fields["a"] <= 20 and 1 <= fields["b"] <= 20
        assert answer == str(fields["a"] + fields["b"])
    elif name == "larger":
        assert fields["a"] != fields["b"] and answer == str(max(fields["a"], fields["b"]))
    elif name == "unit_conversion":
        factor = {"meters": 1000, "millimeters": 1000, "grams": 1000, "milliliters": 1000}
        factor |= {"centimeters": 100, "cents": 100}
        if (fields["src"], fields["dst"]) == ("centimeters", "millimeters"):
            expected = fields["value"] * 10
        elif (fields["src"], fields["dst"]) == ("meters", "millimeters"):
            expected = fields["value"] * 1000
        else:
            expected = fields["value"] * factor[fields["dst"]]
        assert answer == str(expected)
    elif name == "count_items":
        assert answer == str(len(_words(fields["items"])))
        assert 2 <= int(answer) <= 5
    elif name == "sort_numbers":
        assert _nums(answer) == sorted(_nums(fields["numbers"]))
        assert answer == ", ".join(map(str, _nums(answer)))
    elif name == "reverse_list":
        assert _words(answer) == _words(fields["items"])[::-1]
    elif name == "uppercase":
        assert fields["text"].islower() and answer == fields["text"].upper()
    elif name == "lowercase":
        assert fields["text"].isupper() and answer == fields["text"].lower()
    elif name == "extract_email":
        assert re.fullmatch(r"[a-z]+\d+@[a-z.]+", answer) and answer in fields["sentence"]
    elif name == "extract_year":
        assert _nums(fields["sentence"]) == [int(answer)]
    elif name == "extract_city":
        assert answer in fields["sentence"].split() or answer + "." in fields["sentence"]
    elif name == "first_word":
        assert answer == fields["sentence"].split()[0]
    elif name == "last_word":
        assert answer == fields["sentence"].rstrip(".").split()[-1]
    elif name == "sentiment":
        assert answer in ("positive", "negative")
    elif name == "json_person":
        assert json.loads(answer) == {"name": fields["name"], "age": fields["age"]}
    elif name in ("table_lookup", "table_oldest", "table_city"):
        rows = [r.split(" | ") for r in fields["table"].splitlines()]
        assert rows[0] == ["name", "age", "city"] and 3 <= len(rows) - 1 <= 4
        people = {n: (int(a), c) for n, a, c in rows[1:]}
        ages = [a for a, _ in people.values()]
        assert len(set(ages)) == len(ages)
        if name == "table_lookup":
            assert answer == str(people[fields["name"]][0])
        elif name == "table_city":
            assert answer == people[fields["name"]][1]
        else:
            assert people[answer][0] == max(ages)
    elif name == "lowercase_answer":
        assert answer.islower() and answer.capitalize() in fields["sentence"]
    elif name == "word_limit":
        assert answer == f"A {fields['adj']} {fields['noun']}." and 3 <= fields["n"]
    elif name == "json_keys":
        keys = re.findall(r'"(\w+)"', fields["keys"])
        obj = json.loads(answer)
        assert sorted(obj) == sorted(keys) and all(
            str(v) in fields["sentence"] for v in obj.values()
        )
    elif name == "bullet_list":
        items = _words(fields["items"])
        lines = answer.split("\n")
        assert len(lines) == fields["n"] < len(items)
        assert [ln.removeprefix("- ") for ln in lines] == items[: fields["n"]]
    elif name == "include_word":
        assert answer == f"The {fields['noun']} is {fields['word']}."
    elif name == "avoid_word":
        words = fields["sentence"].rstrip(".").split()
        assert fields["word"] in words and answer.rstrip(".").split() == [
            w for w in words if w != fields["word"]
        ]
    elif name == "end_phrase":
        assert answer.endswith(" " + fields["phrase"]) and fields["name"] in answer
    elif name == "lowercase_bullets":
        items = [w.lower() for w in _words(fields["items"])]
        assert answer == "\n".join(f"- {w}" for w in items) and len(items) == fields["n"]
    else:  # pragma: no cover - a new family must get a check here
        raise AssertionError(f"no answer check for family {name}")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_answers_correct(name):
    fam = FAMILIES[name]
    rng = random.Random(123)
    for _ in range(25):
        fields, answer = fam.make(rng)
        _check(name, fields, answer)
        if name in CONSTRAINTS:  # the reference obeys the constraints its prompt states
            assert all(check_all(CONSTRAINTS[name](fields), answer).values()), (name, answer)
        prompt = fam.phrasings[0].format(**fields)
        assert all(str(v) in prompt for v in fields.values())


def test_generated_answers_recomputable_from_prompt():
    for ex in generate("eval", 10, families=["addition", "sort_numbers", "count_items"]):
        p = _prompt(ex)
        if ex.family == "addition":
            assert ex.reference == str(sum(_nums(p)))
        elif ex.family == "sort_numbers":
            assert ex.reference == ", ".join(map(str, sorted(_nums(p))))
        else:
            items = re.search(r"[a-z]+(?:, [a-z]+)+", p).group(0)
            assert ex.reference == str(len(items.split(", ")))


def test_sentiment_labels_balanced_enough():
    labels = Counter(e.reference for e in generate("train", 200, families=["sentiment"]))
    assert labels["positive"] > 60 and labels["negative"] > 60


def test_normalize():
    assert normalize("  5.  ") == "5"
    assert normalize('"Paris"') == "Paris"
    assert normalize("`tokyo`") == "tokyo"
    assert normalize("a   b\n c") == "a b c"
    assert normalize("5..") == "5."
    assert normalize("Paris") != normalize("paris")


def test_score_exact():
    assert score("exact", "5.", "5") == 1.0
    assert score("exact", " 5\n", "5") == 1.0
    assert score("exact", "The answer is 5", "5") == 0.0
    assert score("exact", "Positive", "positive") == 0.0
    ex = generate("eval", 1, families=["addition"])[0]
    assert score(ex, ex.reference + ".", ex.reference) == 1.0
    assert score(FAMILIES["addition"], "3, 7", "3, 7") == 1.0


def test_score_json():
    ref = '{"name": "Anna", "age": 30}'
    assert score("json", '{"age": 30, "name": "Anna"}', ref) == 1.0
    assert score("json", '```json\n{\n  "name": "Anna",\n  "age": 30\n}\n```', ref) == 1.0
    assert score("json", '{"name": "Anna", "age": "30"}', ref) == 0.0
    assert score("json", '{"name": "Anna", "age": 31}', ref) == 0.0
    assert score("json", "name: Anna, age: 30", ref) == 0.0
    assert score("json", 'Here it is: {"name": "Anna", "age": 30}', ref) == 0.0
    ex = generate("eval", 1, families=["json_person"])[0]
    assert score(ex, ex.reference, ex.reference) == 1.0


def test_score_unknown_scorer():
    with pytest.raises(ValueError):
        score("fuzzy", "a", "a")
