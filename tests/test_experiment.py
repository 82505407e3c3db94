"""The transfer experiment's plan: two trainings that differ only in the starting weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from instill.config import load_recipe
from instill.errors import InstillError
from instill.experiment import plan

RECIPES = Path(__file__).resolve().parent.parent / "src" / "instill" / "recipes"


def test_scratch_differs_only_in_its_start(tmp_path):
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}"])
    folder, pre, scratch, notes = plan(recipe, max_steps=12)
    assert folder == tmp_path / "quickstart-transfer"
    assert pre.model.init == "pretrained" and scratch.model.init == "scratch"
    assert scratch.adapter.method == "full" and pre.adapter == recipe.adapter
    assert not scratch.eval.before and pre.eval.before
    for r in (pre, scratch):
        assert r.train.max_steps == 12 and r.train.output_dir == str(folder)
        assert r.data.validation == 0.1 and r.train.eval_every == 1
    same = lambda r: (  # noqa: E731
        r.data.model_copy(update={"replay": None}),
        r.train,
        r.eval.holdout_clusters,
    )
    assert same(pre) == same(scratch)
    assert pre.data.replay == recipe.data.replay and scratch.data.replay is None
    # drift suites measure a model against its own base: random weights have none to keep
    assert "general_gen" in pre.eval.suites
    assert scratch.eval.suites == [s for s in pre.eval.suites if s != "general_gen"]
    assert any("data.validation=0.1" in n for n in notes)


def test_scratch_keeps_no_replay_and_no_kl(tmp_path):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [f"train.output_dir={tmp_path}", "data.replay=0.1", "train.kl_to_base=0.5"],
    )
    _, pre, scratch, _ = plan(recipe, max_steps=12)
    assert pre.data.replay.fraction == 0.1 and pre.train.kl_to_base == 0.5
    assert scratch.data.replay is None and scratch.train.kl_to_base == 0.0
    assert scratch.data.model_copy(update={"replay": None}) == pre.data.model_copy(
        update={"replay": None}
    )


def test_a_four_bit_base_cannot_be_compared_with_scratch(tmp_path):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}", "model.quantize=4bit"]
    )
    with pytest.raises(InstillError, match="quantize must be none"):
        plan(recipe)
