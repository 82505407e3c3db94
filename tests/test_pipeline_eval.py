"""A whole run on the tiny model with every suite, a held-out cluster and a suite scored during
training: what lands in the run directory, and that the report and comparison read it."""

from __future__ import annotations

import json

from instill.data import builtin
from instill.eval.compare import compare
from instill.recipe import run_recipe


def test_run_with_suites_holdout_and_during_training(tiny_recipe, tmp_path, monkeypatch):
    import instill.recipe

    scored = []  # (which side, whether the model scored carries the adapter unmerged)
    real = instill.recipe.run_tasks

    def run_tasks(model, tokenizer, tasks, cfg, name, *args, **kwargs):
        scored.append((name, hasattr(model, "peft_config")))
        return real(model, tokenizer, tasks, cfg, name, *args, **kwargs)

    monkeypatch.setattr(instill.recipe, "run_tasks", run_tasks)
    held = builtin.FAMILIES["uppercase"].cluster
    assert builtin.FAMILIES["addition"].cluster != held
    recipe = tiny_recipe(
        tmp_path,
        "data.validation=0.25",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.eval_every=2",
        "eval.suites=[builtin,general,data]",
        f"eval.holdout_clusters=[{held}]",
        "eval.during_training=builtin",
        "eval.during_training_sample=2",
        "eval.max_new_tokens=4",
    )
    summary = run_recipe(recipe)
    run = summary.run_dir
    # the tuned suites ran on a merged copy (as `instill eval RUN` loads it); the run's model
    # keeps its adapter
    assert scored == [("base", False)] * 3 + [("tuned", False)] * 3
    assert hasattr(summary.model, "peft_config")
    for suite in ("builtin", "general", "data"):
        for stem in (f"base-{suite}", suite):
            assert (run / "eval" / f"{stem}.json").is_file(), stem
            assert (run / "eval" / f"{stem}.jsonl").is_file(), stem
    info = json.loads((run / "run.json").read_text())
    assert info["holdout_clusters"] == [held] and info["base_val_loss"] > 0
    assert set(info["eval_after"]) == {"builtin", "general", "data"}
    # the held-out cluster was never trained on, and is reported as unseen
    assert info["data"]["formats"] == {"builtin": 12}  # generated: 6 per family
    assert info["data"]["rows"] + info["data"]["validation_rows"] == 6  # uppercase's 6 held out
    b = info["eval_after"]["builtin"]
    assert b["by_cluster"][held]["seen"] is False and b["unseen"]["n"] == 2
    data_suite = json.loads((run / "eval" / "data.jsonl").read_text().splitlines()[0])
    assert {"prediction", "reference", "scores", "loss"} <= set(data_suite)
    # the during-training score was logged at every validation point
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_score" in r] == [2, 4]
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 2, 4]
    # report and comparison read what the run wrote
    assert (run / "report.html").is_file() and (run / "performance.png").is_file()
    _, _, tables = compare(str(run))
    assert [t["suite"] for t in tables] == ["builtin", "data", "general"]
    rows = {r.label for r in tables[0]["rows"]}
    assert {"overall", "seen clusters", "unseen clusters"} <= rows
