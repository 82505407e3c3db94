"""`instill eval RUN` writes beside a run's own before/after (RUN/evals/<name>/), never over it
unless asked by name; compare and the report say which results they read, and two sides
evaluated on different splits are never paired (issue 24, item 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instill.data.builtin import FAMILIES
from instill.errors import InstillError
from instill.eval.compare import Side, compare, compare_suite
from instill.eval.results import check_same_split, read_summary
from instill.eval.runner import SuiteResult, write_result
from tests.test_cli import assert_user_error, run, succeed

# split: 2 per family, seed 0, arithmetic held out
FIXTURE = Path(__file__).parent / "fixtures" / "run"


@pytest.fixture
def tuned_run(tmp_path, tiny_dir):
    """The recorded fixture run with a loadable final/ (the tiny model) in place of its own."""
    run_dir = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    shutil.copytree(tiny_dir, run_dir / "final")
    return run_dir


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_eval_of_a_run_leaves_its_own_results_and_uses_its_split(tuned_run, capsys, monkeypatch):
    before = _bytes(tuned_run / "eval")
    succeed(["eval", str(tuned_run), "--suite", "builtin"], monkeypatch)
    out = capsys.readouterr().out
    assert _bytes(tuned_run / "eval") == before  # the run's recorded before/after untouched
    folder = tuned_run / "evals" / "builtin"
    summary = read_summary(folder, "builtin")
    # the run's own split (2 per family, seed 0, arithmetic held out), so it pairs with base-
    assert summary["split"] == {
        "suite": "builtin", "per_family": 2, "seed": 0, "families": None,
        "holdout_clusters": ["arithmetic"],
    }  # fmt: skip
    assert summary["n"] == 2 * len(FAMILIES)
    flat = "".join(out.split())  # rich wraps long paths
    assert f"writtento{folder / 'builtin'}.json" in flat
    assert f"instillcompare{tuned_run}--evalbuiltin" in flat
    # compare reads the base from eval/ and the tuned side from the evaluation, and says so
    sa, sb, tables = compare(str(tuned_run), evaluation="builtin")
    assert (sa.where(), sb.where()) == (f"{tuned_run / 'eval'}/base-*", f"{folder}/")
    assert [t["suite"] for t in tables] == ["builtin"]


def test_eval_with_other_options_is_named_by_them_and_never_paired(tuned_run, capsys, monkeypatch):
    before = _bytes(tuned_run / "eval")
    args = ["eval", str(tuned_run), "--suite", "builtin", "--holdout", "tables"]
    succeed([*args, "--max-new-tokens", "2"], monkeypatch)
    assert _bytes(tuned_run / "eval") == before
    name = "builtin.holdout-tables.max_new_tokens-2"
    assert (tuned_run / "evals" / name / "builtin.json").is_file()
    code, _, err = run(["compare", str(tuned_run), "--eval", name], capsys, monkeypatch)
    assert_user_error(
        code, err, f"{tuned_run / 'eval' / 'base-builtin.json'}",
        f"{tuned_run / 'evals' / name / 'builtin.json'}", "different splits",
        "holdout_clusters ['arithmetic'] vs ['tables']",
    )  # fmt: skip


def test_replacing_the_runs_results_takes_a_named_flag_and_the_runs_split(
    tuned_run, capsys, monkeypatch
):
    before = _bytes(tuned_run / "eval")
    args = ["eval", str(tuned_run), "--suite", "builtin", "--replace-run-results"]
    code, _, err = run([*args, "--per-family", "1"], capsys, monkeypatch)
    assert_user_error(code, err, "--replace-run-results", "differs (per_family 1)")
    assert _bytes(tuned_run / "eval") == before  # refused before evaluating
    succeed(args, monkeypatch)
    after = _bytes(tuned_run / "eval")
    assert after["builtin.json"] != before["builtin.json"]
    assert {k: v for k, v in after.items() if k.startswith("base-")} == {
        k: v for k, v in before.items() if k.startswith("base-")
    }
    assert not (tuned_run / "evals").exists()


def test_name_and_output_are_checked(tuned_run, capsys, monkeypatch, tiny_dir):
    code, _, err = run(["eval", str(tuned_run), "--name", "../x"], capsys, monkeypatch)
    assert_user_error(code, err, "--name '../x'", "plain folder name")
    code, _, err = run(["eval", str(tiny_dir), "--name", "x"], capsys, monkeypatch)
    assert_user_error(code, err, "--name", "is not a run directory")
    out = ["--output", str(tuned_run / "eval")]
    code, _, err = run(["eval", str(tiny_dir), *out], capsys, monkeypatch)
    assert_user_error(code, err, f"--output {tuned_run / 'eval'}", "a run's own results")
    code, _, err = run(["compare", str(tuned_run), "--eval", "nope"], capsys, monkeypatch)
    assert_user_error(code, err, "--eval nope", "evaluations of this run: none")


def _write(folder: Path, split: dict | None, holdout=()):
    records = [{"id": "a", "score": 1.0, "cluster": "c"}, {"id": "b", "score": 0.0, "cluster": "d"}]
    result = SuiteResult("builtin", "m", records, 1.0, "builtin", list(holdout), split=split)
    write_result(result, folder, "builtin")


def test_compare_refuses_two_folders_of_different_splits(tmp_path):
    split = {"suite": "builtin", "per_family": 12, "seed": 0, "families": None,
             "holdout_clusters": []}  # fmt: skip
    _write(tmp_path / "a", split)
    _write(tmp_path / "b", {**split, "per_family": 2})
    with pytest.raises(InstillError) as exc:
        compare(str(tmp_path / "a"), str(tmp_path / "b"))
    text = str(exc.value)
    assert str(tmp_path / "a" / "builtin.json") in text and str(tmp_path / "b" / "builtin.json")
    assert "per_family 12 vs 2" in text
    _write(tmp_path / "c", split)
    assert compare(str(tmp_path / "a"), str(tmp_path / "c"))[2][0]["rows"][0].paired


def test_results_written_before_splits_were_recorded_are_checked_on_held_out_clusters(tmp_path):
    _write(tmp_path / "a", None, holdout=["c"])
    _write(tmp_path / "b", None)
    with pytest.raises(InstillError, match=r"holdout_clusters \['c'\] vs \[\]"):
        compare_suite(Side("a", tmp_path / "a"), Side("b", tmp_path / "b"), "builtin")
    check_same_split({"holdout_clusters": ["c"]}, {"holdout_clusters": ["c"]}, "x", "y")


def test_the_report_says_which_results_it_read(tuned_run):
    from instill.report.run_report import build_run_report

    doc = build_run_report(tuned_run)
    text = json.dumps([getattr(b, "text", "") for b in doc.blocks])
    assert f"read from `{tuned_run / 'eval'}/`" in text
