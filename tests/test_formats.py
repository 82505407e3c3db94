"""Every input format becomes messages; every bad row is an error naming file, line and field."""

import json

import pytest

from instill.config import DataConfig, SourceConfig
from instill.data.dataset import build_data, load_conversations
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
    rows = build_data(tokenizer, DataConfig(sources=[SourceConfig(path=str(f))])).train
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
    convs, _, formats = load_conversations(cfg)
    assert len(convs) == 2 and list(formats.values()) == [1, 1]


def test_weights_repeat_and_subsample(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(10)]
    )
    convs, _, _ = load_conversations(DataConfig(sources=[SourceConfig(path=str(f), weight=1.5)]))
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


def test_unicode_line_separators_inside_strings_do_not_split_rows(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a\u2028b\x85c"}\n{"text": "d"}\n', encoding="utf-8")
    rows = list(read_rows(f))
    assert [r.data["text"] for r in rows] == ["a\u2028b\x85c", "d"] and rows[1].line == 2


def test_missing_file(tmp_path):
    with pytest.raises(InstillError, match="data file not found"):
        list(read_rows(tmp_path / "nope.jsonl"))


def test_rows_losing_all_trained_tokens_are_dropped_and_counted(tokenizer, tmp_path):
    long_prompt = "word " * 400
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": long_prompt, "completion": "yes"}, {"prompt": "short", "completion": "yes"}],
    )
    stats = build_data(
        tokenizer, DataConfig(sources=[SourceConfig(path=str(f))], max_length=64)
    ).stats
    assert stats.rows_in == 2 and stats.rows == 1
    assert stats.dropped == {"no trained tokens within max_length=64": 1}


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "completion": "c"}] * 3), tmp_path / "d.parquet"
    )
    rows = list(read_rows(tmp_path / "d.parquet"))
    assert len(rows) == 3 and rows[2].where.endswith("d.parquet:3")


def test_folder_of_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "d"}])
    assert [r.data["prompt"] for r in read_rows(tmp_path)] == ["p", "q"]


def test_on_error_skip_counts_and_lists_every_bad_row(tokenizer, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"prompt": "a", "completion": "b"}\n'
        "{broken\n"
        '{"prompt": "c", "completion": ""}\n'
        '{"prompt": "d", "completion": "e"}\n'
    )
    cfg = DataConfig(sources=[SourceConfig(path=str(f))], on_error="skip")
    data = build_data(tokenizer, cfg)
    assert data.stats.rows == 2 and data.stats.skipped == 2
    assert [s["where"] for s in data.skipped] == [f"{f}:2", f"{f}:3"]
    assert "not valid JSON" in data.skipped[0]["reason"]
    assert "field 'completion' is empty" in data.skipped[1]["reason"]
    with pytest.raises(InstillError, match=r"d\.jsonl:2: not valid JSON"):
        build_data(tokenizer, cfg.model_copy(update={"on_error": "stop"}))


def test_template_that_refuses_a_row_names_it(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    two_users = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    }
    fine = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [fine, two_users])
    with pytest.raises(InstillError, match=r"d\.jsonl:2: the chat template refused.*alternate"):
        build_data(tok, DataConfig(sources=[SourceConfig(path=str(f))]))
    data = build_data(tok, DataConfig(sources=[SourceConfig(path=str(f))], on_error="skip"))
    assert data.stats.rows == 1 and data.skipped[0]["where"].endswith("d.jsonl:2")


def test_validation_fraction_is_disjoint_and_taken_before_weighting(tokenizer, tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(20)]
    )
    cfg = DataConfig(sources=[SourceConfig(path=str(f), weight=2.0)], validation=0.25, seed=3)
    train, val, _ = load_conversations(cfg)
    val_sources = {c.source for c in val}
    assert len(val) == 5 and len(train) == 30  # 15 kept, each repeated twice
    assert not val_sources & {c.source for c in train}
    again, val2, _ = load_conversations(cfg)
    assert [c.source for c in val2] == [c.source for c in val]  # deterministic by seed


def test_validation_file(tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}] * 4)
    v = write_jsonl(tmp_path / "v.jsonl", [{"prompt": "q", "completion": "d"}] * 2)
    data = build_data(tokenizer, DataConfig(sources=[SourceConfig(path=str(f))], validation=str(v)))
    assert len(data.train) == 4 and len(data.validation) == 2
    assert data.stats.validation_rows == 2


def test_column_mapping_renames_before_detection(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    src = SourceConfig(path=str(f), columns={"question": "prompt", "answer": "completion"})
    (conv,), _, formats = load_conversations(DataConfig(sources=[src]))
    assert conv.messages[-1]["content"] == "a" and "prompt_completion" in next(iter(formats))


def test_missing_required_field_with_explicit_format(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q"}])
    src = SourceConfig(path=str(f), format="prompt_completion")
    with pytest.raises(InstillError, match=r"d\.jsonl:1: missing field 'completion'"):
        load_conversations(DataConfig(sources=[src]))


def test_templates_render_in_a_sandbox(tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(InstillError, match=r"d\.jsonl:1: the chat template refused.*unsafe"):
        build_data(tok, DataConfig(sources=[SourceConfig(path=str(f))]), cache=False)


def test_inspect_counts(tokenizer, tmp_path, monkeypatch):
    from instill.data import inspect_data as inspect_mod

    rows = [{"prompt": "word " * 300, "completion": "yes"}] + [
        {"prompt": f"p{i}", "completion": "c"} for i in range(5)
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    monkeypatch.setattr(inspect_mod, "load_tokenizer", lambda path, cfg: tokenizer)
    report = inspect_mod.inspect_data(
        str(f), model="smollm2-135m-instruct", show_rows=0, max_length=64
    )
    assert report["rows_in"] == 6 and report["rows"] == 5
    assert report["dropped"] == {"no trained tokens within max_length=64": 1}
    assert report["trained_tokens"] == 5 * 2  # "c" and <|im_end|> per row
    assert sum(c for _, _, c in report["histogram"]) == 5
    assert 0 < report["packing_efficiency"] <= 1 and report["rows_per_s"] > 0


def test_inspect_of_a_recipe_leaves_its_held_out_clusters_out(tokenizer, tmp_path, monkeypatch):
    """`data inspect RECIPE` counts what training will see: rows of eval.holdout_clusters are
    kept out (and counted as held out), and a held-out cluster no row has is the run's error."""
    from instill.data import inspect_data as inspect_mod

    rows = [{"prompt": f"bill {i}", "completion": "ok", "cluster": "billing"} for i in range(3)]
    rows += [{"prompt": f"ship {i}", "completion": "ok", "cluster": "shipping"} for i in range(5)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data:\n  sources:\n    - path: {data}\neval:\n  holdout_clusters: [billing]\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(inspect_mod, "load_tokenizer", lambda path, cfg: tokenizer)
    report = inspect_mod.inspect_data(
        str(recipe), model="smollm2-135m-instruct", show_rows=0, max_length=64
    )
    assert report["rows"] == 5 and report["held_out"] == 3 and report["replay_fraction"] == 0.0
    recipe.write_text(recipe.read_text().replace("billing]", "returns]"), encoding="utf-8")
    with pytest.raises(InstillError, match="returns match.*no training row's cluster"):
        inspect_mod.inspect_data(
            str(recipe), model="smollm2-135m-instruct", show_rows=0, max_length=64
        )
