"""Every input format becomes messages; every bad row is an error naming file, line and field."""

import json

import pytest

from instill.config import DataConfig, SourceConfig
from instill.data.dataset import build_training_rows, load_conversations
from instill.data.formats import detect_format, to_conversations
from instill.data.sources import RawRow, read_rows
from instill.errors import InstillError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def convert(data, fmt="auto"):
    row = RawRow(data, "f.jsonl", 3)
    return to_conversations(row, detect_format(data) if fmt == "auto" else fmt)


def test_alpaca_with_and_without_input():
    (c,) = convert({"instruction": "Sum.", "input": "2 3", "output": "5"})
    assert c.messages == (
        {"role": "user", "content": "Sum.\n\n2 3"},
        {"role": "assistant", "content": "5"},
    )
    (c,) = convert({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert c.messages[0]["content"] == "Say hi."


def test_openai_messages_multi_turn_with_system():
    msgs = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    (c,) = convert({"messages": msgs})
    assert list(c.messages) == msgs


def test_sharegpt_roles_are_mapped():
    (c,) = convert(
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "u"},
                {"from": "gpt", "value": "a"},
            ]
        }
    )
    assert [m["role"] for m in c.messages] == ["system", "user", "assistant"]


def test_prompt_completion_keeps_metadata():
    (c,) = convert({"prompt": "p", "completion": "c", "cluster": "sentiment", "dataset": "imdb"})
    assert c.meta == {"cluster": "sentiment", "dataset": "imdb"}


def test_selfinstruct_one_example_per_instance():
    convs = convert(
        {
            "id": "seed_task_0",
            "name": "breakfast",
            "instruction": "Suggest food.",
            "instances": [{"input": "", "output": "eggs"}, {"input": "vegan", "output": "tofu"}],
        }
    )
    assert [c.messages[-1]["content"] for c in convs] == ["eggs", "tofu"]
    assert convs[1].messages[0]["content"] == "Suggest food.\n\nvegan"
    assert convs[0].meta["task"] == "breakfast"


def test_text_rows_train_on_every_token(tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "The cat sat."}])
    rows, stats = build_training_rows(tokenizer, DataConfig(sources=[SourceConfig(path=str(f))]))
    assert rows[0].input_ids[-1] == tokenizer.eos_token_id
    assert sum(rows[0].mask) == len(rows[0].input_ids)


def test_csv_and_json_array(tmp_path):
    (tmp_path / "a.csv").write_text("prompt,completion\nhello,world\n")
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "i", "output": "o"}]))
    cfg = DataConfig(
        sources=[
            SourceConfig(path=str(tmp_path / "a.csv")),
            SourceConfig(path=str(tmp_path / "b.json")),
        ]
    )
    convs, formats = load_conversations(cfg)
    assert len(convs) == 2 and list(formats.values()) == [1, 1]


def test_weights_repeat_and_subsample(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)]
    )
    convs, _ = load_conversations(DataConfig(sources=[SourceConfig(path=str(f), weight=1.5)]))
    assert len(convs) == 15


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"prompt": "a", "completion": "b"}\n{not json}\n', r"d\.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}\n', r"d\.jsonl:1: cannot detect the data format"),
        ('{"instruction": "a", "output": ""}\n', r"d\.jsonl:1: field 'output' is empty"),
        ('{"instruction": "a", "output": 5}\n', r"d\.jsonl:1: field 'output' must be a string"),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}\n',
            r"d\.jsonl:1: field 'messages' message 0: unknown role 'robot'",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}]}\n',
            r"d\.jsonl:1: field 'messages': the conversation ends on a user turn",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, '
            '{"role": "assistant", "content": " "}]}\n',
            r"d\.jsonl:1: field 'messages' message 1: empty assistant reply",
        ),
        (
            '{"messages": [{"role": "user", "content": 3}, '
            '{"role": "assistant", "content": "a"}]}\n',
            r"d\.jsonl:1: field 'messages' message 0: 'content' must be a string",
        ),
        ("[1, 2]\n", r"d\.jsonl:1: each line must be a JSON object"),
        ("  \n", r"d\.jsonl: file is empty"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, pattern):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(InstillError, match=pattern):
        load_conversations(DataConfig(sources=[SourceConfig(path=str(f))]))


def test_invalid_utf8_names_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(InstillError, match=r"d\.jsonl:2: invalid UTF-8"):
        list(read_rows(f))


def test_missing_file(tmp_path):
    with pytest.raises(InstillError, match="data file not found"):
        list(read_rows(tmp_path / "nope.jsonl"))


def test_rows_losing_all_trained_tokens_are_dropped_and_counted(tokenizer, tmp_path):
    long_prompt = "word " * 400
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": long_prompt, "completion": "yes"}, {"prompt": "short", "completion": "yes"}],
    )
    rows, stats = build_training_rows(
        tokenizer, DataConfig(sources=[SourceConfig(path=str(f))], max_length=64)
    )
    assert stats.rows_in == 2 and stats.rows == 1
    assert stats.dropped == {"no trained tokens within max_length=64": 1}
