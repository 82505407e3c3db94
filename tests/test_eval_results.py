"""eval.results: the one reader of evaluation results, against what eval.runner writes."""

from __future__ import annotations

import pytest

from instill.errors import InstillError
from instill.eval.results import all_summaries, read_records, read_summary, result_stems
from instill.eval.runner import SuiteResult, load_result, write_result

RECORDS = [
    {"id": "a", "prompt": "p1", "prediction": "x", "score": 1.0, "cluster": "c1", "family": "f"},
    {"id": "b", "prompt": "p2", "prediction": "y", "score": 0.0, "cluster": "c2", "family": "f"},
]


def _write(folder, stem, suite="builtin", holdout=()):
    result = SuiteResult(suite, "m", RECORDS, 1.5, metric="exact_match", holdout=list(holdout))
    write_result(result, folder, stem)
    return result


def test_reads_back_exactly_what_the_runner_wrote(tmp_path):
    written = _write(tmp_path, "builtin", holdout=["c2"])
    assert read_summary(tmp_path, "builtin") == written.summary()
    assert read_records(tmp_path, "builtin") == RECORDS
    again = load_result(tmp_path, "builtin")  # the runner's reuse goes through the same reader
    assert again.summary() == written.summary() and again.records == RECORDS


def test_missing_results_are_none_not_errors(tmp_path):
    assert read_summary(tmp_path, "nothing") is None
    assert read_records(tmp_path, "nothing") is None
    assert load_result(tmp_path, "nothing") is None
    assert all_summaries(tmp_path / "no-such-folder") == {}


def test_stems_pair_summaries_with_records_and_keep_base_apart(tmp_path):
    _write(tmp_path, "builtin")
    _write(tmp_path, "base-builtin")
    _write(tmp_path, "general")
    (tmp_path / "general.jsonl").unlink()  # a summary alone is not a result to compare
    assert result_stems(tmp_path) == ["builtin"]
    assert result_stems(tmp_path, "base-") == ["builtin"]
    assert sorted(all_summaries(tmp_path)) == ["base-builtin", "builtin", "general"]


def test_a_broken_summary_names_its_file(tmp_path):
    (tmp_path / "builtin.json").write_text('{"suite": "builtin",\n "score": }')
    with pytest.raises(InstillError, match=r"builtin.json:2: not valid JSON"):
        read_summary(tmp_path, "builtin")


def test_a_kill_between_records_and_summary_is_detected(tmp_path):
    """A result is two atomic writes, records then summary; the summary holds the records'
    sha256. A kill between the two (new records, old summary) is a mismatched pair: reading it
    is an error naming both files and how to redo them, and the runner's reuse evaluates the
    suite again instead of keeping it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from instill.eval import runner
        folder = Path({str(tmp_path)!r})
        rec = {{"id": "a", "prompt": "p", "prediction": "x", "score": 1.0}}
        runner.write_result(runner.SuiteResult("builtin", "m", [rec], 1.0), folder)
        runner.write_text = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        again = runner.SuiteResult("builtin", "m", [{{**rec, "score": 0.0}}], 1.0)
        runner.write_result(again, folder)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin.json", "builtin.jsonl"]
    said = (
        f"{tmp_path / 'builtin.json'} and {tmp_path / 'builtin.jsonl'} do not belong together "
        "(the records were rewritten after this summary: an evaluation was cut short between "
        f"the two files); evaluate that suite again into {tmp_path} to rewrite both"
    )
    for read in (read_summary, read_records):
        with pytest.raises(InstillError) as info:
            read(tmp_path, "builtin")
        assert str(info.value) == said
    assert load_result(tmp_path, "builtin") is None  # a resumed run evaluates it again
    _write(tmp_path, "builtin")  # evaluating again rewrites a matching pair
    assert read_records(tmp_path, "builtin") == RECORDS
