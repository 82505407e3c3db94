"""Evaluation: tasks from every source, choice log-likelihood against a hand computation,
held-out clusters kept out of training, results on disk, and comparisons with intervals."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from instill.cli import main
from instill.config import DataConfig, EvalConfig, Recipe, SourceConfig
from instill.data import builtin
from instill.data.dataset import build_data
from instill.errors import InstillError
from instill.eval.compare import compare
from instill.eval.likelihood import choose, reply_logprobs
from instill.eval.runner import SuiteResult, evaluate, write_result
from instill.eval.suites import data_task, run_tasks
from instill.eval.tasks import file_task, general_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- tasks from files -------------------------------------------------------------------------


def test_file_task_reads_references_in_every_form(tmp_path):
    f = write_jsonl(
        tmp_path / "suite.jsonl",
        [
            {"prompt": "2+2?", "reference": "4", "cluster": "math"},
            {"prompt": "Capital of Peru?", "references": ["Lima", "lima city"]},
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            {"instruction": "Say yes.", "output": "yes", "task": "agree"},
        ],
    )
    task = file_task("mine", f)
    assert task.metric == "exact_match"
    refs = [ex.reference for ex in task.examples]
    assert refs == ["4", ("Lima", "lima city"), "Hello", "yes"]
    assert [ex.prompt[-1]["content"] for ex in task.examples] == [
        "2+2?",
        "Capital of Peru?",
        "Hi",
        "Say yes.",
    ]
    assert [ex.cluster for ex in task.examples] == ["math", "", "", "agree"]
    assert len({ex.id for ex in task.examples}) == 4


def test_file_task_choices_by_text_or_index(tmp_path):
    f = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"prompt": "Colour of grass?", "choices": ["red", "green"], "answer": 1},
            {"prompt": "Colour of snow?", "choices": ["white", "black"], "answer": "white"},
        ],
    )
    task = file_task("mc", f)
    assert task.metric == "choice"
    assert [ex.reference for ex in task.examples] == ["green", "white"]


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ([{"prompt": "no answer here"}], "suite.jsonl:1: no reference answer"),
        (
            [{"prompt": "x", "choices": ["a", "b"], "answer": "c"}],
            "suite.jsonl:1: 'answer' must be",
        ),
        ([{"prompt": "x", "choices": ["a", "b"], "answer": 5}], "outside 'choices'"),
        (
            [
                {"prompt": "x", "choices": ["a", "b"], "answer": 0},
                {"prompt": "y", "reference": "z"},
            ],
            "some rows have 'choices'",
        ),
    ],
)
def test_file_task_bad_input_names_the_line(tmp_path, rows, fragment):
    f = write_jsonl(tmp_path / "suite.jsonl", rows)
    with pytest.raises(InstillError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        file_task("suite", f)


def test_unknown_metric_and_suite_names(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "reference": "b"}])
    with pytest.raises(InstillError, match="unknown metric 'bleu'; choose one of exact_match"):
        file_task("s", f, metric="bleu")
    with pytest.raises(ValueError, match="unknown suite 'bultin'"):
        EvalConfig(suites=["bultin"])


def test_general_suite_ships_with_the_package():
    task = general_task()
    assert task.metric == "choice" and len(task.examples) >= 60
    assert len({ex.cluster for ex in task.examples}) >= 4
    assert all(ex.reference in ex.choices for ex in task.examples)


# ---- likelihood -------------------------------------------------------------------------------


def _manual_reply_logprob(model, tokenizer, prompt, reply, with_end):
    """Full-logits reference: log p(reply tokens | rendered prompt)."""
    text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": reply}], tokenize=False
    )
    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    n = len(reply_ids) + (1 if with_end else 0)  # + <|im_end|>
    assert ids[n_prefix : n_prefix + len(reply_ids)] == reply_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(n_prefix, n_prefix + n)), n


def test_reply_logprobs_match_full_logits(tiny, tokenizer):
    prompt = [{"role": "user", "content": "Name a colour."}]
    convs = [[*prompt, {"role": "assistant", "content": r}] for r in ("blue", "dark green")]
    for with_end in (True, False):
        got = reply_logprobs(tiny, tokenizer, convs, include_end=with_end, batch_size=2)
        for conv, score in zip(convs, got, strict=True):
            want, n = _manual_reply_logprob(tiny, tokenizer, prompt, conv[-1]["content"], with_end)
            assert score.tokens == n
            assert score.logprob == pytest.approx(want, abs=1e-4)


def test_choose_picks_the_highest_logprob_per_byte(tiny, tokenizer):
    prompt = [{"role": "user", "content": "Pick one."}]
    options = ["apple", "a small red car", "zebra"]
    ((best, scores),) = choose(tiny, tokenizer, [prompt], [options])
    means = []
    for o in options:
        lp, _ = _manual_reply_logprob(tiny, tokenizer, prompt, o, with_end=False)
        means.append(lp / len(o.encode()))
    assert scores == pytest.approx(means, abs=1e-4)
    assert best == max(range(3), key=means.__getitem__)


# ---- held-out clusters ------------------------------------------------------------------------


def _cluster_of(family):
    return builtin.FAMILIES[family].cluster


def test_holdout_cluster_never_reaches_training_rows(tokenizer):
    held = _cluster_of("addition")
    cfg = DataConfig(builtin={"train_per_family": 4, "eval_per_family": 2}, validation=0.2)
    data = build_data(tokenizer, cfg, holdout=frozenset([held]), cache=False)
    families = {r.source.split(":", 1)[1] for r in data.train + data.validation}
    held_families = {f for f, fam in builtin.FAMILIES.items() if fam.cluster == held}
    assert families and not families & held_families
    assert data.stats.held_out == 4 * len(held_families)  # counted, for the report's data table
    assert data.stats.held_out + data.stats.rows_in + data.stats.validation_rows == 4 * len(
        builtin.FAMILIES
    )
    full = build_data(tokenizer, cfg, cache=False)
    assert {r.source.split(":", 1)[1] for r in full.train} >= held_families  # control
    # the data suite evaluates the held-out cluster's rows, flagged unseen
    recipe = Recipe(data=cfg, eval={"holdout_clusters": [held], "suites": ["data"]})
    task = data_task(recipe)
    unseen = [ex for ex in task.examples if ex.cluster == held]
    assert unseen and all(ex.cluster in task.holdout for ex in unseen)
    assert any(ex.cluster != held for ex in task.examples)  # validation rows: seen clusters


def test_holdout_on_a_file_with_cluster_fields(tokenizer, tmp_path):
    rows = [
        {"prompt": f"q{i}", "completion": f"a{i}", "cluster": c}
        for i, c in enumerate(["qa", "qa", "sentiment", "summary", "sentiment", "qa"])
    ]
    f = write_jsonl(tmp_path / "t0.jsonl", rows)
    cfg = DataConfig(sources=[SourceConfig(path=str(f))])
    data = build_data(tokenizer, cfg, holdout=frozenset(["sentiment"]), cache=False)
    assert len(data.train) == 4
    with pytest.raises(InstillError, match="'?sentimnt'? match.*qa, sentiment, summary"):
        build_data(tokenizer, cfg, holdout=frozenset(["sentimnt"]), cache=False)


# ---- results and comparison -------------------------------------------------------------------


def _result(scores_by_cluster, model, holdout=()):
    records = []
    for cluster, scores in scores_by_cluster.items():
        for i, s in enumerate(scores):
            records.append(
                {
                    "id": f"{cluster}{i}",
                    "cluster": cluster,
                    "family": cluster,
                    "seen": cluster not in holdout,
                    "score": s,
                    "scores": {"exact_match": s},
                }
            )
    return SuiteResult("suite", model, records, 1.0, "exact_match", list(holdout))


def test_summary_reports_seen_and_unseen(tmp_path):
    r = _result({"a": [1, 1, 0, 0], "b": [1, 0]}, "m", holdout=["b"])
    s = r.summary()
    assert s["score"] == pytest.approx(0.5) and s["n"] == 6
    assert s["seen"]["score"] == 0.5 and s["seen"]["n"] == 4
    assert s["unseen"]["score"] == 0.5 and s["unseen"]["n"] == 2
    assert s["by_cluster"]["b"]["seen"] is False and s["by_cluster"]["a"]["seen"] is True


def test_compare_two_result_folders(tmp_path, capsys, monkeypatch):
    base = _result({"a": [0.0] * 30, "b": [0.0] * 10}, "base", holdout=["b"])
    tuned = _result({"a": [1.0] * 30, "b": [0.0] * 9 + [1.0]}, "tuned", holdout=["b"])
    write_result(base, tmp_path / "base")
    write_result(tuned, tmp_path / "tuned")
    _, _, tables = compare(str(tmp_path / "base"), str(tmp_path / "tuned"))
    rows = {r.label.strip(): r for r in tables[0]["rows"]}
    assert rows["overall"].delta == pytest.approx(31 / 40) and rows["overall"].paired
    assert rows["seen clusters"].significant and rows["seen clusters"].delta == 1.0
    assert rows["unseen clusters"].delta == pytest.approx(0.1)
    assert not rows["unseen clusters"].significant  # one example of ten: inside the interval
    monkeypatch.setattr(
        sys,
        "argv",
        ["instill", "compare", str(tmp_path / "base"), str(tmp_path / "tuned"), "--json"],
    )
    main()  # success returns; failures exit
    out = json.loads(capsys.readouterr().out)
    assert out["suites"][0]["rows"][0]["label"] == "overall"


def test_compare_without_results_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["instill", "compare", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "no base-model results" in err


def test_run_tasks_writes_records_and_summary(tiny, tokenizer, tmp_path):
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": f"Say {w}.", "reference": w, "cluster": c}
            for w, c in [("yes", "x"), ("no", "x"), ("maybe", "y")]
        ],
    )
    task = file_task("s", f, metric="token_f1")
    cfg = EvalConfig(batch_size=2, max_new_tokens=3)
    results = run_tasks(tiny, tokenizer, [task], cfg, "tiny", tmp_path / "out")
    records = [json.loads(x) for x in (tmp_path / "out" / "s.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "out" / "s.json").read_text())
    assert len(records) == 3 and summary["n"] == 3 and summary["metric"] == "token_f1"
    for r in records:
        assert r["score"] == r["scores"]["token_f1"]
        assert set(r) >= {"prompt", "prediction", "reference", "score", "loss"}
    assert summary["loss"] > 0 and summary["perplexity"] > 1
    assert results["s"].summary()["score"] == summary["score"]


def test_builtin_scorer_is_the_primary_metric(tiny, tokenizer):
    from instill.eval.runner import generation_records
    from instill.eval.tasks import builtin_task
    from instill.infer.generate import Generation

    task = builtin_task(1, 0, ["addition"])
    result = evaluate(tiny, tokenizer, task, EvalConfig(max_new_tokens=2), "tiny")
    for r in result.records:
        assert r["score"] == r["scores"]["builtin"]
    # the tiny model's replies score 0 by every metric; a reply that only the family's own
    # scorer accepts (the JSON object, fenced and spaced otherwise) shows which one is primary
    task = builtin_task(1, 0, ["json_person"])
    reply = "```json\n" + json.dumps(json.loads(task.examples[0].reference), indent=1) + "\n```"
    (r,) = generation_records(task, [Generation(reply, 1, 1, "stop")])
    assert r["scores"]["builtin"] == 1.0 and r["scores"]["exact_match"] == 0.0
    assert r["score"] == 1.0


def test_a_template_that_cannot_render_a_prompt_names_the_row(tiny, tokenizer, tmp_path):
    import copy

    strict = copy.copy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}], "reference": "hello"},
            {
                "messages": [
                    {"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "hi"},
                ],
                "reference": "hello",
            },
        ],
    )
    task = file_task("s", f)
    with pytest.raises(InstillError, match=r"suite s, .*s.jsonl:2: the model's chat template"):
        evaluate(tiny, strict, task, EvalConfig(max_new_tokens=2), "tiny")


def test_constraint_records_and_instruction_level_summary(tiny, tokenizer):
    from instill.data.constraints import check_all
    from instill.eval.tasks import builtin_task

    task = builtin_task(2, 0, ["lowercase_bullets", "word_limit"])
    result = evaluate(tiny, tokenizer, task, EvalConfig(max_new_tokens=4), "tiny")
    for r, ex in zip(result.records, task.examples, strict=True):
        assert r["constraints"] == check_all(ex.scorer.constraints, r["prediction"])
        assert r["score"] == float(all(r["constraints"].values()))
    # hand-made records: two prompts with two and one constraints
    result.records = [
        {"cluster": "c", "family": "f", "score": 0.0, "scores": {},
         "constraints": {"bullets(n=2)": True, "lowercase": False}},
        {"cluster": "c", "family": "g", "score": 1.0, "scores": {},
         "constraints": {"max_words(n=3)": True}},
    ]  # fmt: skip
    s = result.summary()
    assert s["score"] == 0.5  # prompt level: both constraints of a prompt must hold
    assert s["constraints"]["instruction_level"]["score"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["constraints"]["instruction_level"]["n"] == 3
    by_kind = {k: v["score"] for k, v in s["constraints"]["by_kind"].items()}
    assert by_kind == {"bullets": 1.0, "lowercase": 0.0, "max_words": 1.0}
