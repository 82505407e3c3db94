"""Config and resume traps of a whole run (run_recipe on the tiny model): what is refused, when
(before the base evaluation, before any work), and what a resume after a kill recovers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from instill import recipe as pipeline
from instill.config import load_recipe
from instill.errors import InstillError
from instill.jsonl import read_jsonl
from instill.train.checkpoint import check_resumable

RUN = [
    "data.validation=0.25",
    "data.replay=null",
    "train.max_steps=4",
    "train.batch_size=2",
    "train.eval_every=2",
    "train.save_every=2",
    "train.log_every=1",
    "eval.suites=[builtin]",
    "eval.holdout_clusters=[]",
    "eval.max_new_tokens=2",
]


def recipe(tiny_recipe, out, *extra):
    return tiny_recipe(out, *RUN, *extra)


@pytest.fixture(scope="module")
def finished(tiny_recipe, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, and checkpoints/best."""
    out = tmp_path_factory.mktemp("runs")
    summary = pipeline.run_recipe(recipe(tiny_recipe, out))
    run = summary.run_dir
    assert (run / "checkpoints" / "step-2" / "resume.json").is_file()
    assert (run / "checkpoints" / "best" / ".complete").is_file()
    return out, run


@pytest.fixture
def unfinished(finished, tmp_path):
    """A copy of the run as a kill at step 4 would leave it: no final/, and a metrics line cut
    in half."""
    _, run = finished
    out = tmp_path / "out"
    copy = Path(shutil.copytree(run, out / run.name))
    shutil.rmtree(copy / "final")
    (copy / "run.json").unlink()
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')
    return out, copy


def no_base_evaluation(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the base evaluation ran before the refusal")

    monkeypatch.setattr(pipeline, "run_tasks", fail)
    monkeypatch.setattr(pipeline, "_base_validation", fail)


def test_validation_written_like_5e_2_is_a_fraction(tmp_path):
    """YAML 1.1 reads 5e-2 (no dot) as a string; it must not become a file path."""
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  builtin: {}\n  validation: 5e-2\n")
    assert load_recipe(path).data.validation == pytest.approx(0.05)
    assert load_recipe(path, ["data.validation=2.5e-1"]).data.validation == pytest.approx(0.25)
    assert load_recipe(path, ["data.validation=val.jsonl"]).data.validation == "val.jsonl"
    with pytest.raises(InstillError, match=r"data\.validation.*\[0, 1\)"):
        load_recipe(path, ["data.validation=5e0"])


def test_resume_from_best_or_final_is_refused_before_any_work(
    finished, unfinished, tiny_recipe, monkeypatch
):
    out, run = unfinished
    no_base_evaluation(monkeypatch)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    # final/ holds weights only, like best/ (copied in, as a user might point at it)
    shutil.copytree(finished[1] / "final", run / "weights")
    for folder in ("checkpoints/best", "weights"):
        r = recipe(tiny_recipe, out, f"train.resume={run / folder}")
        with pytest.raises(InstillError, match=r"holds weights only.*checkpoints/step-N"):
            pipeline.run_recipe(r)
    r = recipe(tiny_recipe, out, f"train.resume={run / 'nothing'}")
    with pytest.raises(InstillError, match=r"nothing is not a complete checkpoint"):
        pipeline.run_recipe(r)


def test_resume_of_changed_data_or_processes_is_refused_saying_what(
    unfinished, tiny_recipe, monkeypatch
):
    out, run = unfinished
    no_base_evaluation(monkeypatch)
    changed = recipe(tiny_recipe, out, "train.resume=auto", "data.builtin.train_per_family=7")
    with pytest.raises(InstillError, match=r"data\.sha256: checkpoint has '[0-9a-f]{64}'"):
        pipeline.run_recipe(changed)
    # the same data with two processes: each step would see other rows
    same = recipe(tiny_recipe, out, "train.resume=auto")
    from instill.data.dataset import build_data
    from instill.models import load_model

    loaded = load_model(same.model)
    data = build_data(loaded.tokenizer, same.data)
    step = check_resumable(run / "checkpoints" / "step-2", pipeline.fingerprint(same, data, 1))
    assert step == 2
    with pytest.raises(
        InstillError, match=(r"batching\.processes: checkpoint has 1, this run has 2")
    ):
        check_resumable(run / "checkpoints" / "step-2", pipeline.fingerprint(same, data, 2))


def test_resume_after_a_kill_with_a_torn_metrics_line(unfinished, tiny_recipe):
    out, run = unfinished
    summary = pipeline.run_recipe(
        recipe(tiny_recipe, out, f"train.resume={run}/checkpoints/step-2")
    )
    assert summary.train.steps == 4 and (run / "final" / ".complete").is_file()
    logged = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in logged if "val_loss" in r] == [0, 2, 4]


def test_compile_without_a_compiler_stops_before_any_work(tiny_recipe, tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    no_base_evaluation(monkeypatch)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    r = recipe(tiny_recipe, tmp_path, "train.compile=true")
    with (
        inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
        pytest.raises(InstillError, match=r"train\.compile: .*C\+\+ compiler"),
    ):
        pipeline.run_recipe(r)
    assert not (tmp_path / r.name).exists()  # no run directory was made


def test_resume_auto_never_clears_a_folder_instill_did_not_write(
    tiny_recipe, tmp_path, monkeypatch
):
    """resume=auto with nothing to resume from starts afresh, but only in a folder that holds an
    instill run: a folder of the user's own files (or a run with files added to it) is refused,
    naming the folder and what is in it, and nothing in it is touched."""
    no_base_evaluation(monkeypatch)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "out"
    run = out / "quickstart"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    r = recipe(tiny_recipe, out, "train.resume=auto")
    with pytest.raises(InstillError) as info:
        pipeline.run_recipe(r)
    assert str(info.value) == (
        f"{run} holds no instill run (no config.yaml written by instill train for "
        "quickstart), so train.resume=auto will not clear it to start afresh; move its files "
        "away, or choose another name (name=...) or train.output_dir"
    )
    assert (run / "notes.txt").read_text() == "mine"
    # a run's own files, with one of the user's among them
    pipeline._write_yaml(run / "config.yaml", r.model_dump(mode="json"))
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 2.0}\n')
    with pytest.raises(InstillError) as info:
        pipeline.run_recipe(r)
    assert str(info.value) == (
        f"{run} holds files instill does not write (notes.txt), so train.resume=auto will not "
        "clear it to start afresh; move them away, or choose another name (name=...) or "
        "train.output_dir"
    )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl", "notes.txt"]


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tiny_recipe, tmp_path):
    """What a kill before the first complete checkpoint leaves (the config, the base's
    validation loss, data stats, a checkpoint cut short as a hidden leftover) is instill's:
    resume=auto clears it and trains from the start."""
    from tests.test_atomic import dead_pid

    out = tmp_path / "out"
    run = out / "quickstart"
    r = recipe(tiny_recipe, out, "train.resume=auto")
    run.mkdir(parents=True)
    pipeline._write_yaml(run / "config.yaml", r.model_dump(mode="json"))
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 2.0}\n')
    (run / "data_stats.json").write_text("{}\n")
    cut = run / "checkpoints" / f".step-2.tmp-{dead_pid()}-abcd1234"
    cut.mkdir(parents=True)
    (cut / "model.safetensors").write_bytes(b"half")
    summary = pipeline.run_recipe(r)
    assert summary.train.steps == 4 and (run / "final" / ".complete").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    logged = read_jsonl(run / "metrics.jsonl")
    assert [rec["step"] for rec in logged if "loss" in rec] == [1, 2, 3, 4]
