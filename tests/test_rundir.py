"""The run directory has one owner (instill.rundir): its names, and the recipe read back through
the typed schema with the schema's defaults, never a copy of them."""

import re
import sys
from pathlib import Path

import pytest
import yaml

from instill.errors import InstillError

FIXTURE = Path(__file__).parent / "fixtures" / "run"
SRC = Path(__file__).resolve().parent.parent / "src" / "instill"


def _run(tmp_path, config: dict | None, final: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    if final:
        (run / "final").mkdir()
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_paths(tmp_path):
    from instill.rundir import RunDir

    r = RunDir(tmp_path)
    assert r.config == tmp_path / "config.yaml"
    assert r.record_file == tmp_path / "run.json"
    assert r.data_stats == tmp_path / "data_stats.json"
    assert r.skipped_rows == tmp_path / "skipped_rows.jsonl"
    assert r.metrics == tmp_path / "metrics.jsonl"
    assert r.tensorboard == tmp_path / "tensorboard"
    assert r.checkpoints == tmp_path / "checkpoints"
    assert r.best == tmp_path / "checkpoints" / "best"
    assert r.final == tmp_path / "final"
    assert r.results == tmp_path / "eval"
    assert r.deployed == tmp_path / "eval" / "deployed"
    assert r.deployed_score("/x/export/gguf-q8_0/") == tmp_path / "eval" / "deployed" / "gguf-q8_0"
    assert r.evaluation("builtin") == tmp_path / "evals" / "builtin"
    assert r.export("hf-fp32") == tmp_path / "export" / "hf-fp32"
    for bad in ("", "..", "a/b"):
        with pytest.raises(InstillError, match="plain folder name"):
            r.evaluation(bad)


def test_of_finds_a_run_or_its_final(tmp_path):
    from instill.rundir import RunDir

    run = _run(tmp_path, {"name": "x"})
    assert RunDir.of(run).root == run
    assert RunDir.of(run / "final").root == run
    assert RunDir.of(tmp_path) is None
    assert RunDir.holding(run / "final").root == run
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    assert RunDir.holding(run / "checkpoints" / "step-2").root == run


def _within(raw, typed) -> bool:
    if isinstance(raw, dict):
        return all(k in typed and _within(v, typed[k]) for k, v in raw.items())
    return raw == typed


def test_the_fixture_run_reads_back_typed():
    from instill.rundir import RunDir

    r = RunDir(FIXTURE)
    raw = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    recipe = r.recipe()
    # an older config (no report.currency, ...): what it says, plus the schema's defaults
    assert _within(raw, recipe.model_dump(mode="json"))
    assert recipe.report.currency == "USD" and "currency" not in raw["report"]
    split = r.split()
    assert split.per_family == raw["data"]["builtin"]["eval_per_family"]
    assert split.seed == raw["data"]["builtin"]["seed"]
    assert split.holdout == raw["eval"]["holdout_clusters"]
    assert split.max_new_tokens == raw["eval"]["max_new_tokens"]
    assert r.record()["name"] == raw["name"]


def test_left_out_keys_take_the_schemas_defaults(tmp_path, monkeypatch):
    """A recipe that leaves keys out reads them as the schema's defaults: change a default in
    config/ and the run's split follows (nothing downstream keeps its own copy of 12)."""
    from instill.config import schema
    from instill.eval.gguf import run_split
    from instill.rundir import RunDir

    run = _run(tmp_path, {"name": "x", "data": {"sources": [{"path": "rows.jsonl"}]},
                          "eval": {"holdout_clusters": ["tables"]}})  # fmt: skip
    split = run_split(run)
    assert (split.per_family, split.seed, split.families, split.max_new_tokens) == (12, 0, None, 32)
    assert split.holdout == ["tables"]
    monkeypatch.setattr(schema.BuiltinDataConfig.model_fields["eval_per_family"], "default", 5)
    schema.BuiltinDataConfig.model_rebuild(force=True)
    try:
        split = RunDir(run).split()
        assert split.per_family == 5
    finally:
        monkeypatch.undo()
        schema.BuiltinDataConfig.model_rebuild(force=True)
    # no config.yaml at all: the schema's defaults, as before
    bare = tmp_path / "bare"
    (bare / "final").mkdir(parents=True)
    assert run_split(bare).per_family == 12 and run_split(bare).max_new_tokens == 32


OLD = {"name": "old", "model": {"name": "some-base", "quantize": "none"},
       "train": {"lr": 1e-4, "gradient_accumulation": 4}}  # fmt: skip
OLD_KEY = r"config\.yaml: unknown key 'train\.gradient_accumulation'"


def test_an_old_config_is_one_clear_error_in_every_reader(tmp_path):
    """A config.yaml that no longer validates (a key this version does not know) used to be
    read raw, its other keys guessed; now each reader names the file and the key."""
    from instill.eval.command import run_base_model
    from instill.eval.gguf import run_split
    from instill.models.load import trained_quantize

    run = _run(tmp_path, OLD)
    for read in (lambda: run_split(run), lambda: trained_quantize(run / "final"),
                 lambda: run_base_model(str(run))):  # fmt: skip
        with pytest.raises(InstillError, match=OLD_KEY) as info:
            read()
        assert str(run / "config.yaml") in str(info.value)
        assert "change or remove that key" in str(info.value)


def test_an_old_config_in_export_is_one_clear_error(tmp_path):
    from instill.export.tuned import load_tuned

    run = _run(tmp_path, OLD)
    with pytest.raises(InstillError, match=OLD_KEY):
        load_tuned(run)


def test_report_of_an_old_config_says_which_key(tmp_path, capsys, monkeypatch):
    from instill.cli import main

    run = _run(tmp_path, OLD)
    monkeypatch.setattr(sys, "argv", ["instill", "report", str(run)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "unknown key 'train.gradient_accumulation'" in err
    assert "--price-per-hour" in err


def test_a_current_config_reads_in_every_reader(tmp_path):
    from instill.eval.command import run_base_model
    from instill.models.load import trained_quantize

    run = _run(tmp_path, {"name": "x", "model": {"name": "some-base", "quantize": "4bit"}})
    assert trained_quantize(run / "final") == "4bit"
    assert run_base_model(str(run)) == "some-base"
    assert run_base_model(str(run / "final")) == "some-base"
    (tmp_path / "s").mkdir()
    scratch = _run(tmp_path / "s", {"name": "x", "model": {"init": "scratch"}})
    assert run_base_model(str(scratch)) is None
    assert trained_quantize(tmp_path / "nowhere" / "final") == "none"


NAMES = ("config.yaml", "run.json", "data_stats.json", "metrics.jsonl", "skipped_rows.jsonl")


def test_no_other_module_spells_the_run_names():
    found = []
    names = "|".join(re.escape(n) for n in NAMES)
    folders = "final|eval|evals|checkpoints|export|tensorboard"
    pattern = re.compile(rf"""["'](?:{names})["']|/ ["'](?:{folders})["']""")
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # a path under the package itself (Path(__file__)...) is not a run's
            if pattern.search(line) and "__file__" not in line:
                found.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert found == []
