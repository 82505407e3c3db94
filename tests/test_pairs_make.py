"""`instill pairs make`: self-checked preference pairs. The split into passing and failing and
the pick of a pair are pure functions, tested on injected replies; one CLI run on the untied
tiny model checks the files, the held-out prompts and that the same seed gives the same bytes."""

from __future__ import annotations

import json
import sys

import pytest

from instill import pairs
from instill.data import builtin
from instill.data.examples import EvalExample
from instill.data.preference import Labelled, Pair, read_preferences
from instill.errors import InstillError
from instill.eval.tasks import builtin_examples
from instill.infer import Generation, GenParams, generate

EX = EvalExample(id="ex1", prompt=({"role": "user", "content": "2 + 3? Number only."},),
                 reference="5", family="addition", cluster="arithmetic")  # fmt: skip


def gen(text: str, tokens: int | None = None, finish: str = "stop") -> Generation:
    return Generation(text, 10, len(text.split()) if tokens is None else tokens, finish)


def test_shortest_passing_is_chosen_and_a_failing_one_rejected():
    replies = [gen("The answer is 5.", 5), gen("5", 1), gen("6", 1), gen("It is 7, I think.", 6)]
    c = pairs.choose(EX, replies, [1.0, 1.0, 0.0, 0.0])
    assert (c.passing, c.failing, c.chosen) == ((0, 1), (2, 3), 1)
    assert c.rejected in (2, 3)
    assert pairs.choose(EX, replies, [1.0, 1.0, 0.0, 0.0]) == c  # the same seed, the same pick


def test_rejected_is_drawn_by_seed_not_by_length_or_order():
    replies = [gen("5"), gen("six"), gen("seven and a much longer wrong reply")]
    picks = {pairs.choose(EX, replies, [1, 0, 0], seed=s).rejected for s in range(20)}
    assert picks == {1, 2}


def test_ties_in_length_go_to_the_first_sampled():
    c = pairs.choose(EX, [gen("x", 1), gen("5", 1), gen("5.", 1)], [0.0, 1.0, 1.0])
    assert (c.chosen, c.rejected) == (1, 0)


@pytest.mark.parametrize("scores", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
def test_all_passing_or_all_failing_gives_no_pair(scores):
    c = pairs.choose(EX, [gen("5"), gen("five"), gen("5!")], scores)
    assert c.chosen is None and c.rejected is None
    assert pairs.pair_rows(EX, [gen("5")] * 3, scores, c) == []


def test_a_reply_cut_at_max_new_tokens_never_passes():
    replies = [gen("5", 1, "length"), gen("6", 1)]
    c = pairs.choose(EX, replies, [1.0, 0.0])
    assert (c.passing, c.failing, c.chosen, c.cut) == ((), (0, 1), None, 1)


def test_empty_replies_are_in_no_row():
    replies = [gen("5"), gen("  \n", 0), gen("6")]
    c = pairs.choose(EX, replies, [1.0, 0.0, 0.0])
    assert (c.failing, c.rejected, c.empty) == ((2,), 2, 1)
    assert [r["completion"][0]["content"] for r in pairs.labelled_rows(EX, replies, [1, 0, 0], c)] \
        == ["5", "6"]  # fmt: skip


def test_failing_text_equal_to_the_chosen_one_is_not_rejected():
    # the same text passes once (ended) and fails once (cut): no pair teaches anything
    c = pairs.choose(EX, [gen("5", 1), gen("5", 1, "length")], [1.0, 1.0])
    assert (c.passing, c.failing, c.chosen) == ((0,), (1,), None)


def test_graded_scores_pass_at_the_threshold():
    replies = [gen("a b c"), gen("a b"), gen("q")]
    c = pairs.choose(EX, replies, [0.9, 0.6, 0.2], threshold=0.6)
    assert (c.passing, c.failing, c.chosen, c.rejected) == ((0, 1), (2,), 1, 2)
    assert pairs.choose(EX, replies, [0.9, 0.6, 0.2], threshold=1.0).passing == ()


def test_more_pairs_per_prompt_reject_each_distinct_failing_text_once():
    replies = [gen("5", 1), gen("five", 1), gen("6", 1), gen("7", 1), gen("6", 1),
               gen("It is 8.", 4), gen("5", 2, "length")]  # fmt: skip
    scores = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    one = pairs.choose(EX, replies, scores, seed=3)
    many = pairs.choose(EX, replies, scores, seed=3, pairs=5)
    assert many.pairs[0] == one.pairs[0]  # raising the count only adds pairs
    rejected = [replies[b].text for _, b in many.pairs]
    # 6, 7 and "It is 8." once each; the cut "5" is failing but a passing text, never rejected
    assert sorted(rejected) == ["6", "7", "It is 8."]
    assert [a for a, _ in many.pairs][:2] in ([0, 1], [1, 0])  # passing texts in turn
    assert pairs.choose(EX, replies, scores, seed=3, pairs=2).pairs == many.pairs[:2]
    rows = pairs.pair_rows(EX, replies, scores, many)
    assert all(r["chosen"] != r["rejected"] for r in rows) and len(rows) == 3


def test_rows_read_back_as_pairs_and_labelled(tmp_path):
    replies = [gen("The answer is 5."), gen("5"), gen("6"), gen("6")]
    scores = [1.0, 1.0, 0.0, 0.0]
    c = pairs.choose(EX, replies, scores)
    [row] = pairs.pair_rows(EX, replies, scores, c)
    assert row == {
        "prompt": [{"role": "user", "content": "2 + 3? Number only."}],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
        "task": "addition", "cluster": "arithmetic", "id": "ex1",
        "chosen_score": 1.0, "rejected_score": 0.0,
    }  # fmt: skip
    labelled = pairs.labelled_rows(EX, replies, scores, c)
    assert [(r["completion"][0]["content"], r["label"]) for r in labelled] == [
        ("The answer is 5.", True), ("5", True), ("6", False)]  # fmt: skip
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    read, fmt = read_preferences(str(tmp_path / "p.jsonl"))
    assert fmt == "pairs" and isinstance(read[0], Pair)
    assert read[0].chosen == ({"role": "assistant", "content": "5"},)
    assert read[0].meta == {"task": "addition", "cluster": "arithmetic"}
    read, fmt = read_preferences(str(tmp_path / "k.jsonl"))
    assert fmt == "kto" and [r.desirable for r in read] == [True, True, False]
    assert all(isinstance(r, Labelled) for r in read)


def test_replies_are_scored_by_the_tasks_own_scorer():
    task = pairs.training_task("builtin", 1, 0, "auto", frozenset(), ())
    examples = [ex for ex in task.examples if ex.family in ("json_person", "word_limit")]
    task.examples = examples
    wrong = {"json_person": "no", "word_limit": " ".join(["far too many words"] * 40)}
    gens = [gen(r) for ex in examples for r in (ex.reference, wrong[ex.family])]
    assert pairs.score_replies(task, gens, 2) == [1.0, 0.0, 1.0, 0.0]


def test_training_task_leaves_out_held_out_clusters_and_never_uses_eval_prompts():
    task = pairs.training_task("builtin", 3, 0, "auto", frozenset({"tables"}), ("tables",))
    assert task.examples and {ex.cluster for ex in task.examples} == (
        set(builtin.clusters()) - {"tables"}
    )
    prompts = {ex.prompt[-1]["content"] for ex in task.examples}
    assert prompts == {
        ex.prompt[-1]["content"] for ex in builtin_examples("train", 3, 0) if ex.cluster != "tables"
    }
    assert not prompts & {ex.prompt[-1]["content"] for ex in builtin_examples("eval", 40, 0)}


def test_family_picks_builtin_families_without_changing_their_prompts():
    every = pairs.training_task("builtin", 2, 0, "auto", frozenset(), ())
    some = pairs.training_task("builtin", 2, 0, "auto", frozenset(), (), ("larger", "addition"))
    assert {ex.family for ex in some.examples} == {"larger", "addition"}
    assert {ex.id for ex in some.examples} == {
        ex.id for ex in every.examples if ex.family in ("larger", "addition")}  # fmt: skip
    with pytest.raises(InstillError, match="--family adition: no such built-in family"):
        pairs.training_task("builtin", 2, 0, "auto", frozenset(), (), ("adition",))


def test_unknown_holdout_cluster_is_an_error():
    with pytest.raises(InstillError, match="--holdout tabels: no such cluster in builtin"):
        pairs.training_task("builtin", 1, 0, "auto", frozenset({"tabels"}), ("tabels",))


def test_seeded_samples_per_conversation_equal_one_by_one(chatty, tokenizer):
    conv = [{"role": "user", "content": "Name a colour."}]
    params = [GenParams(max_new_tokens=6, temperature=0.8, seed=s) for s in (1, 2, 3)]
    together = generate(chatty, tokenizer, [conv] * 3, params, batch_size=3)
    alone = [generate(chatty, tokenizer, [conv], p)[0] for p in params]
    assert [g.text for g in together] == [g.text for g in alone]
    assert len({g.text for g in together}) == 3  # each sample its own seed


@pytest.fixture(scope="module")
def chatty_run(tokenizer, tmp_path_factory):
    """A run directory around the untied tiny model, holding out `tables` in its config."""
    from conftest import build_tiny

    run = tmp_path_factory.mktemp("run")
    build_tiny(tokenizer, tied=False).save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    config = {"eval": {"holdout_clusters": ["tables"], "max_new_tokens": 6}}
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return run


def _make(run, out, monkeypatch, *extra):
    from instill.cli import main

    # the tiny random model passes nothing and never ends a reply: score a reply by its
    # length's parity instead, cut or not, so both kinds occur and the file holds pairs (the
    # scorers and the cut rule are tested above)
    monkeypatch.setattr(
        pairs, "score_replies", lambda task, gens, k: [float(len(g.text) % 2) for g in gens]
    )
    monkeypatch.setattr(pairs, "passes", lambda reply, score, threshold: score >= threshold)
    argv = ["instill", "pairs", "make", str(run), "--out", str(out), "--per-family", "1",
            "--k", "3", "--kto", str(out.with_suffix(".kto.jsonl")), *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()


def test_cli_writes_readable_pairs_without_held_out_prompts_same_seed_same_bytes(
    chatty_run, tmp_path, monkeypatch, capsys
):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _make(chatty_run, a, monkeypatch, "--holdout", "casing")
    assert "pairs from 21 prompts" in capsys.readouterr().out
    _make(chatty_run, b, monkeypatch, "--holdout", "casing")
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".kto.jsonl").read_bytes() == b.with_suffix(".kto.jsonl").read_bytes()
    rows, fmt = read_preferences(str(a))
    assert fmt == "pairs" and rows and all(isinstance(r, Pair) for r in rows)
    clusters = {r.meta["cluster"] for r in rows}
    assert not clusters & {"tables", "casing"}  # the run's held-out cluster and the given one
    train = {ex.prompt[-1]["content"] for ex in builtin_examples("train", 1, 0)}
    assert {r.prompt[-1]["content"] for r in rows} <= train
    summary = json.loads((tmp_path / "a.jsonl.summary.json").read_text())
    assert summary["holdout_clusters"] == ["casing", "tables"]
    assert summary["max_new_tokens"] == 6  # the run's eval.max_new_tokens
    assert summary["prompts"] == 21 and summary["replies"] == 63
    assert summary["pairs_written"] == summary["prompts_with_pairs"] == len(rows)
    assert set(summary["by_family"]) == {
        f for c, fams in builtin.clusters().items() if c not in ("tables", "casing") for f in fams
    }
    kto, fmt = read_preferences(str(a.with_suffix(".kto.jsonl")))
    assert fmt == "kto" and summary["kto_rows"] == len(kto)
    _make(chatty_run, b, monkeypatch, "--holdout", "casing", "--seed", "1")
    assert a.read_bytes() != b.read_bytes()


def test_cli_bad_option_is_one_line(chatty_run, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _make(chatty_run, tmp_path / "x.jsonl", monkeypatch, "--k", "1")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().startswith("error: --k 1: Input should be greater than or equal to 2")
    assert not (tmp_path / "x.jsonl").exists()


def test_suite_file_rows_with_references(tmp_path):
    suite = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"Say {w}.", "reference": w, "cluster": c}
            for w, c in (("yes", "a"), ("no", "a"), ("maybe", "b"))]  # fmt: skip
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = pairs.training_task(str(suite), None, 0, "auto", frozenset({"b"}), ("b",))
    assert task.metric == "exact_match"
    assert [ex.reference for ex in task.examples] == ["yes", "no"]
    assert pairs.score_replies(task, [gen("Yes"), gen("no"), gen("no"), gen("No.")], 2) == [
        1.0, 0.0, 1.0, 1.0]  # fmt: skip
    with pytest.raises(InstillError, match="--metric choice: pairs need a reply scored"):
        pairs.training_task(str(suite), None, 0, "choice", frozenset(), ())
    with pytest.raises(InstillError, match="--holdout c: no such cluster"):
        pairs.training_task(str(suite), None, 0, "auto", frozenset({"c"}), ("c",))
