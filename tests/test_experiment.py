"""The transfer experiment's plan: two trainings that differ only in the starting weights (and
what that forces), and the recipe as shipped beside them when it trains on other rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from instill.config import load_recipe
from instill.errors import InstillError
from instill.experiment import plan
from instill.jsonl import read_jsonl

RECIPES = Path(__file__).resolve().parent.parent / "src" / "instill" / "recipes"


def test_the_two_starts_train_the_same_rows_and_steps(tmp_path):
    """Issue 29: the quickstart replays the base model's replies (data.replay: 0.1), which random
    weights cannot give; the pretrained start is compared without them, on the scratch run's
    rows, and the recipe as shipped runs as a third training beside the comparison."""
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}"])
    assert recipe.data.replay.fraction == 0.1
    p = plan(recipe, max_steps=12)
    assert p.folder == tmp_path / "quickstart-transfer"
    pre, scratch, shipped = p.pretrained, p.scratch, p.shipped
    assert pre.model.init == "pretrained" and scratch.model.init == "scratch"
    assert scratch.adapter.method == "full" and pre.adapter == recipe.adapter
    assert not scratch.eval.before and pre.eval.before
    for r in (pre, scratch, shipped):
        assert r.train.max_steps == 12 and r.train.output_dir == str(p.folder)
        assert r.data.validation == 0.1 and r.train.eval_every == 1
    # like for like: the same data section (rows, replay none), the same training settings
    assert pre.data == scratch.data and pre.data.replay is None
    assert pre.train == scratch.train and pre.train.kl_to_base == 0.0
    assert pre.eval.holdout_clusters == scratch.eval.holdout_clusters
    # drift suites measure a model against its own base: random weights have none to keep
    assert "general_gen" in pre.eval.suites
    assert scratch.eval.suites == [s for s in pre.eval.suites if s != "general_gen"]
    # the recipe as shipped: its replay kept, its untuned scores are the pretrained run's
    assert shipped.name == "shipped" and shipped.data.replay == recipe.data.replay
    assert shipped.adapter == recipe.adapter and shipped.eval.suites == recipe.eval.suites
    assert not shipped.eval.before
    assert shipped.data.model_copy(update={"replay": None}) == pre.data
    assert any("data.validation=0.1" in n for n in p.notes)
    assert any("data.replay" in n and "shipped" in n for n in p.notes)


def test_on_the_quickstart_the_starts_differ_only_where_random_weights_force_it(tmp_path):
    """The settings the transfer report will name as different (report/arms.py reads the
    same resolved config back): the start, the adapter, the drift suite and the untuned
    evaluation; no data or training setting."""
    from instill.report.arms import flatten

    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}"])
    p = plan(recipe)
    a, b = (flatten(r.model_dump(mode="json")) for r in (p.pretrained, p.scratch))
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} == {
        "name", "model.init", "adapter.method", "eval.before", "eval.suites",
    }  # fmt: skip
    c = flatten(p.shipped.model_dump(mode="json"))
    assert {k for k in a if a[k] != c[k]} == {"name", "data.replay", "eval.before"}


def test_a_recipe_without_replay_needs_no_third_training(tmp_path):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}", "data.replay=null"]
    )
    p = plan(recipe, max_steps=12)
    assert p.shipped is None and p.pretrained.data == p.scratch.data
    assert [r.name for r in p.runs] == ["pretrained", "scratch"]


def test_kl_to_base_is_left_to_the_shipped_run(tmp_path):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [f"train.output_dir={tmp_path}", "data.replay=0.1", "train.kl_to_base=0.5"],
    )
    p = plan(recipe, max_steps=12)
    assert p.pretrained.data.replay is None and p.pretrained.train.kl_to_base == 0.0
    assert p.scratch.data.replay is None and p.scratch.train.kl_to_base == 0.0
    assert p.shipped.data.replay.fraction == 0.1 and p.shipped.train.kl_to_base == 0.5
    assert [r.name for r in p.runs] == ["pretrained", "scratch", "shipped"]


def test_resume_refuses_a_finished_training_planned_otherwise(tmp_path, monkeypatch):
    """An experiment begun before issue 29's change holds a pretrained run trained with replay;
    --resume must not keep it as the like-for-like arm."""
    import yaml

    from instill.experiment import transfer

    def trains(*a, **k):
        raise AssertionError("a training started")

    monkeypatch.setattr("instill.recipe.run_recipe", trains)
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}"])
    p = plan(recipe, max_steps=12)
    old = p.shipped.model_copy(update={"name": "pretrained", "eval": p.pretrained.eval})
    run = p.folder / "pretrained"
    (run / "final").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump(old.model_dump(mode="json")))
    with pytest.raises(InstillError, match=r"pretrained: trained with other settings.*replay"):
        transfer(recipe, max_steps=12, resume=True)


def test_a_four_bit_base_cannot_be_compared_with_scratch(tmp_path):
    recipe = load_recipe(
        RECIPES / "quickstart.yaml", [f"train.output_dir={tmp_path}", "model.quantize=4bit"]
    )
    with pytest.raises(InstillError, match="quantize must be none"):
        plan(recipe)


def test_scratch_trains_every_weight_even_when_the_recipe_freezes_some(tmp_path):
    recipe = load_recipe(RECIPES / "full.yaml", [f"train.output_dir={tmp_path}"])
    assert recipe.adapter.freeze == ["embed_tokens"]
    p = plan(recipe, max_steps=12)
    assert p.pretrained.adapter.freeze == ["embed_tokens"] and p.scratch.adapter.freeze == []
    assert any("adapter.freeze ['embed_tokens'] dropped" in n for n in p.notes)


def _transfer_recipe(tiny_recipe, out):
    return tiny_recipe(
        out,
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.lr=1e-3",
        "train.save_every=null",
        "eval.suites=[builtin]",
        "eval.holdout_clusters=[]",
        "eval.max_new_tokens=2",
        recipe="full.yaml",
    )


def test_transfer_runs_both_starts_and_writes_the_report(tiny_recipe, tiny_dir, tmp_path):
    """The whole experiment on the tiny model with full.yaml: the pretrained run keeps its
    frozen embeddings, the scratch run trains its random ones, and the report is written."""
    from safetensors.torch import load_file

    from instill.experiment import transfer
    from instill.models import load_model

    recipe = _transfer_recipe(tiny_recipe, tmp_path)
    page = transfer(recipe, max_steps=4)
    folder = tmp_path / "full-transfer"
    assert page.parent == folder and page.is_file() and (folder / "report.md").is_file()
    key = "model.embed_tokens.weight"
    original = load_file(next(Path(tiny_dir).glob("*.safetensors")))[key]
    pretrained = load_file(folder / "pretrained" / "final" / "model.safetensors")[key]
    assert (pretrained == original).all()  # frozen, as full.yaml says
    scratch = plan(recipe, max_steps=4).scratch
    start = load_model(scratch.model, seed=scratch.train.seed).model.state_dict()[key]
    tuned = load_file(folder / "scratch" / "final" / "model.safetensors")[key]
    assert tuned.shape == start.shape and not (tuned == start).all()  # trained
    # the report opens with what the two runs' records say differed, and what did not
    first = (folder / "report.md").read_text().split("\n\n")[1]
    assert "frozen modules: embed_tokens vs none" in first
    assert "model.init pretrained vs scratch" in first
    assert "adapter.freeze [embed_tokens] vs []" in first
    assert "steps 4;" in first and " steps 4 vs" not in first
    assert not (folder / "shipped").exists()  # full.yaml has no replay: no third training
    with pytest.raises(InstillError, match="pass --resume to continue it or --overwrite"):
        transfer(recipe, max_steps=4)


def test_interrupted_transfer_stops_and_resumes(tiny_recipe, tmp_path, monkeypatch):
    from instill.experiment import transfer
    from instill.train import loop

    class StopAtOnce(loop._StopFlag):  # as if SIGTERM came during the first step
        def __enter__(self):
            super().__enter__()
            self.requested = True
            return self

    recipe = _transfer_recipe(tiny_recipe, tmp_path)
    folder = tmp_path / "full-transfer"
    with monkeypatch.context() as m:
        m.setattr(loop, "_StopFlag", StopAtOnce)
        assert transfer(recipe, max_steps=4) is None
    assert sorted(p.name for p in (folder / "pretrained" / "checkpoints").iterdir()) == [
        "best",
        "step-1",
    ]
    assert not (folder / "scratch").exists()  # the second training never started
    page = transfer(recipe, max_steps=4, resume=True)
    assert page.is_file()
    for run in ("pretrained", "scratch"):
        assert (folder / run / "final" / ".complete").is_file()
    steps = [r["step"] for r in read_jsonl(folder / "pretrained" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # continued, not restarted twice


def test_a_recipe_with_replay_runs_as_shipped_beside_the_comparison(
    tiny_recipe, tokenizer, tmp_path, monkeypatch
):
    """The tiny model through the whole experiment with replay: the two starts train the same
    rows, the recipe as written trains its replay rows as a third run, and the report names
    the difference and shows the fourth column."""
    import json

    from instill.experiment import transfer
    from instill.infer.generate import Generation

    monkeypatch.setenv("INSTILL_HOME", str(tmp_path / "home"))
    # the random tiny model only writes newlines, which make no replay row (as test_drift.py)
    words = tokenizer("A reply of a few words.", add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def fixed(model, tok, convs, *a, **k):
        return [Generation("A reply of a few words.", 1, len(words), "stop", (*words, eot))
                for _ in convs]  # fmt: skip

    monkeypatch.setattr("instill.infer.generate", fixed)
    recipe = tiny_recipe(
        tmp_path,
        "data.builtin.train_per_family=8",
        "data.replay.fraction=0.2",
        "data.replay.max_new_tokens=6",
        "train.batch_size=4",
        "train.save_every=null",
        "eval.suites=[builtin, general_gen]",
        "eval.general_gen_per_kind=1",
        "eval.gen_max_new_tokens=5",
        "eval.max_new_tokens=2",
        "eval.holdout_clusters=[]",
    )
    assert transfer(recipe, max_steps=3).is_file()
    folder = tmp_path / "quickstart-transfer"
    stats = {
        n: json.loads((folder / n / "data_stats.json").read_text())
        for n in ("pretrained", "scratch", "shipped")
    }
    assert stats["pretrained"] == stats["scratch"] and stats["pretrained"]["replay_rows"] == 0
    replayed = stats["shipped"]["replay_rows"]
    assert replayed > 0
    assert not (folder / "shipped" / "eval" / "base-builtin.json").exists()
    md = (folder / "report.md").read_text()
    first = md.split("\n\n")[1]
    assert "The recipe as shipped (its own column) differed from the pretrained run in:" in first
    assert f"replay rows {replayed} vs 0" in first
    assert "training rows" not in first.split("The recipe as shipped")[0].split("The same")[0]
    assert "| suite | pretrained, untuned | scratch, tuned | pretrained, tuned | " in md
    assert "Forgetting: pretrained-tuned as shipped before and after tuning" in md
