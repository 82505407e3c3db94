"""`instill generate`: one output row per input row, in order, resumable, errors name the line.
On the untied tiny model (`chatty`): its replies differ by prompt, so rows out of order show."""

from __future__ import annotations

import json

import pytest

from instill.errors import InstillError
from instill.infer import GenParams, generate
from instill.infer.batch import generate_file

ROWS = [
    {"prompt": "Name a colour."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Count to three, please, slowly."},
        ]
    },
    "What is two plus two?",
    {"prompt": "Hi", "id": 7},
]
PARAMS = GenParams(max_new_tokens=6)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_in_order_equal_generate(chatty, tokenizer, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, ROWS)
    assert generate_file(chatty, tokenizer, src, dst, PARAMS, batch_size=3) == (4, 0)
    out = _read(dst)
    convs = [
        [{"role": "user", "content": "Name a colour."}],
        ROWS[1]["messages"],
        [{"role": "user", "content": ROWS[2]}],
        [{"role": "user", "content": "Hi"}],
    ]
    want = generate(chatty, tokenizer, convs, PARAMS)
    assert [r["output"] for r in out] == [g.text for g in want]
    assert len({r["output"] for r in out}) == 4  # each row its own reply: the order shows
    assert [r["completion_tokens"] for r in out] == [g.completion_tokens for g in want]
    assert out[3]["id"] == 7 and out[2]["prompt"] == ROWS[2]


def test_resume_skips_done_rows_and_cuts_a_partial_line(chatty, tokenizer, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, ROWS)
    generate_file(chatty, tokenizer, src, dst, PARAMS)
    full = dst.read_text()
    lines = full.splitlines(keepends=True)
    dst.write_text(lines[0] + lines[1] + lines[2][:10])  # a crash mid-write of row 3
    assert generate_file(chatty, tokenizer, src, dst, PARAMS) == (2, 2)
    assert dst.read_text() == full
    assert generate_file(chatty, tokenizer, src, dst, PARAMS) == (0, 4)  # nothing left to do


@pytest.mark.parametrize(
    "line,message",
    [
        ("{broken", "in.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', "in.jsonl:2: messages[0] needs"),
        ('{"messages": [{"role": "user", "content": 3}]}', "in.jsonl:2: messages[0].content"),
        ('{"text": "x"}', "in.jsonl:2: expected a 'messages' list or a 'prompt' string"),
    ],
)
def test_errors_name_the_line(chatty, tokenizer, tmp_path, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(InstillError, match=message.replace("[", r"\[").replace("]", r"\]")):
        generate_file(chatty, tokenizer, src, tmp_path / "out.jsonl", PARAMS)
    assert not (tmp_path / "out.jsonl").exists()  # the input is checked before any work


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "instill",
            "generate",
            str(tmp_path),
            "--input",
            str(tmp_path / "missing.jsonl"),
            "--output",
            str(tmp_path / "o.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error:" in r.stderr and "missing.jsonl: input file not found" in r.stderr


def test_input_that_is_not_utf8_names_the_file_and_line(tiny, tokenizer, tmp_path):
    """A Latin-1 byte (é as 0xE9) on line 3: one error with FILE:LINE, as training data says."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InstillError) as info:
        generate_file(tiny, tokenizer, src, tmp_path / "out.jsonl", PARAMS)
    assert str(info.value) == f"{src}:3: invalid UTF-8 (byte 47); re-encode the file as UTF-8"
    assert not (tmp_path / "out.jsonl").exists()
