"""The one JSONL reader and writer (instill.jsonl) and the places that read JSONL through it:
records whose text holds U+2028 / U+0085 (the T0 mix has such rows) survive every round trip,
and a metrics.jsonl cut mid-line by a kill does not break resume or the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instill.errors import InstillError
from instill.eval.compare import compare
from instill.infer.batch import generate_file, read_inputs
from instill.infer.generate import GenParams
from instill.jsonl import read_jsonl, write_jsonl
from instill.report import write_run_report
from instill.report.plots import read_metrics
from instill.train.logs import Metrics

FIXTURE = Path(__file__).parent / "fixtures" / "run"
ODD = "line\u2028separator, next\x85line, para\u2029graph, form\x0cfeed, vt\x0bab"


def test_records_with_unicode_line_breaks_stay_whole(tmp_path):
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"text": ODD}, {"text": "plain"}])
    text = path.read_text(encoding="utf-8")
    assert "\u2028" in text and "\x85" in text  # written unescaped (ensure_ascii=False)...
    assert len(text.splitlines()) > 2  # ...so splitlines() would cut the first record apart
    assert read_jsonl(path) == [{"text": ODD}, {"text": "plain"}]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # no temporary file left


def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(InstillError, match=r"r\.jsonl:3: not a JSON record"):
        read_jsonl(path)


def test_torn_last_line_is_dropped_only_when_asked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    assert read_jsonl(path, torn_tail=True) == [{"step": 1}, {"step": 2}]
    with pytest.raises(InstillError, match=r"metrics\.jsonl:3"):
        read_jsonl(path)
    # a user's file without a final newline: its last line is read like any other
    path.write_text('{"step": 1}\n{"step": 2}', encoding="utf-8")
    assert read_jsonl(path, torn_tail=True) == [{"step": 1}, {"step": 2}]
    # a bad line that is not the last is an error even with torn_tail
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(InstillError, match=r"metrics\.jsonl:2"):
        read_jsonl(path, torn_tail=True)


def test_resume_trims_metrics_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    note = json.dumps({"step": 2, "loss": 2.5, "note": ODD}, ensure_ascii=False)
    path.write_text(
        '{"step": 0, "val_loss": 3.0}\n' + note + '\n{"step": 4, "loss": 2.0}\n{"step": 5, "lo',
        encoding="utf-8",
    )
    Metrics(path.parent).trim(2)  # what a resume from step 2 does
    assert read_jsonl(path) == [
        {"step": 0, "val_loss": 3.0}, {"step": 2, "loss": 2.5, "note": ODD},
    ]  # fmt: skip
    train, val = read_metrics(path)
    assert [r["step"] for r in train] == [2] and [r["step"] for r in val] == [0]


def test_generate_input_with_unicode_line_breaks(tiny, tokenizer, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        json.dumps({"prompt": ODD}, ensure_ascii=False) + "\n" + '{"prompt": "Hi"}\n',
        encoding="utf-8",
    )
    rows = read_inputs(src)
    assert [m for _, m in rows] == [
        [{"role": "user", "content": ODD}], [{"role": "user", "content": "Hi"}],
    ]  # fmt: skip
    assert generate_file(tiny, tokenizer, src, dst, GenParams(max_new_tokens=3)) == (2, 0)
    out = read_jsonl(dst)
    assert [r["prompt"] for r in out] == [ODD, "Hi"]
    # a second call finds both rows done: the odd characters do not fool the row count
    assert generate_file(tiny, tokenizer, src, dst, GenParams(max_new_tokens=3)) == (0, 2)


def test_report_and_compare_of_a_run_with_odd_records(tmp_path):
    run = Path(shutil.copytree(FIXTURE, tmp_path / "run"))
    for stem in ("builtin", "base-builtin"):
        path = run / "eval" / f"{stem}.jsonl"
        records = read_jsonl(path)
        records[0]["prediction"] = ODD
        records[1]["prompt"] = ODD
        write_jsonl(path, records)
    _, report = write_run_report(run)
    assert report.is_file()
    _, _, tables = compare(str(run))
    overall = next(t for t in tables if t["suite"] == "builtin")["rows"][0]
    n = len(read_jsonl(run / "eval" / "builtin.jsonl"))
    assert (overall.n_a, overall.n_b, overall.paired) == (n, n, True)
