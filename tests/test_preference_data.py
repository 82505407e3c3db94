"""Preference rows: every format becomes exact messages, bad rows are errors naming file and
line, and pairs render to the prompt's tokens once plus each reply's tokens and mask."""

import json

import pytest

from instill.config import DataConfig, SourceConfig
from instill.data.dataset import build_data
from instill.data.formats import detect_format
from instill.data.preference import (
    Labelled,
    Pair,
    detect_preference_format,
    read_preferences,
    unpaired,
)
from instill.data.preference_tokens import LabelledRow, PairRow, tokenize_preferences
from instill.errors import InstillError

IM_END, NL = 2, 198
U = {"role": "user", "content": "Add 2 and 3."}
A5, A6 = {"role": "assistant", "content": "5"}, {"role": "assistant", "content": "6"}
SYSTEM = {"role": "system", "content": "Be brief."}
# The real SmolLM2 chat template: "Be brief." as system, "Add 2 and 3." as user, then the
# generation prompt "<|im_start|>assistant\n" (tests/test_render.py pins the same tokens).
PROMPT_IDS = [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 7684, 216, 34, 284, 216, 35]
PROMPT_IDS += [30, 2, 198, 1, 520, 9531, 198]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_one(tmp_path, row, name="p.jsonl"):
    items, fmt = read_preferences(write_jsonl(tmp_path / name, [row]))
    return items[0], fmt


def test_prompt_chosen_rejected_strings_with_system(tmp_path):
    row = {"prompt": "Add 2 and 3.", "chosen": "5", "rejected": "6", "system": "Be brief."}
    pair, fmt = read_one(tmp_path, {**row, "cluster": "math"})
    assert fmt == "pairs"
    assert pair == Pair((SYSTEM, U), (A5,), (A6,), f"{tmp_path / 'p.jsonl'}:1", {"cluster": "math"})


def test_prompt_chosen_rejected_as_messages(tmp_path):
    row = {"prompt": [SYSTEM, U], "chosen": [A5], "rejected": [A6]}
    pair, fmt = read_one(tmp_path, row)
    assert fmt == "pairs"
    assert (pair.prompt, pair.chosen, pair.rejected) == ((SYSTEM, U), (A5,), (A6,))


def test_whole_conversations_split_at_longest_common_prefix(tmp_path):
    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    row = {"chosen": [*hi, U, A5], "rejected": [*hi, U, A6]}
    pair, fmt = read_one(tmp_path, row)
    assert fmt == "conversation_pairs"
    assert (pair.prompt, pair.chosen, pair.rejected) == ((*hi, U), (A5,), (A6,))


@pytest.mark.parametrize(
    "chosen,rejected",
    [
        ([U, A5], [{"role": "user", "content": "other"}, A6]),  # nothing shared
        ([U, A5, U, A5], [U, A5, {"role": "user", "content": "x"}, A6]),  # differ at a user turn
        ([U, A5], [U, A5, U, A6]),  # one is a prefix of the other
    ],
)
def test_conversations_without_a_shared_prompt_are_refused(tmp_path, chosen, rejected):
    with pytest.raises(InstillError, match=r"p\.jsonl:1: 'chosen' and 'rejected' do not share"):
        read_one(tmp_path, {"chosen": chosen, "rejected": rejected})


def test_anthropic_hh_transcripts(tmp_path):
    head = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Add 2 and 3."
    row = {"chosen": head + "\n\nAssistant: 5", "rejected": head + "\n\nAssistant: 6"}
    pair, fmt = read_one(tmp_path, row)
    assert fmt == "hh"
    hi = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})
    assert (pair.prompt, pair.chosen, pair.rejected) == ((*hi, U), (A5,), (A6,))


def test_text_that_is_not_a_transcript_names_line(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
        {"chosen": "just text", "rejected": "other text"},
    ]
    with pytest.raises(InstillError, match=r"p\.jsonl:2: field 'chosen' is not a Human:/Assist"):
        read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))


def test_sharegpt_and_alpaca_ranking_rows(tmp_path):
    row = {
        "conversations": [{"from": "human", "value": "Add 2 and 3."}],
        "chosen": {"from": "gpt", "value": "5"},
        "rejected": {"from": "gpt", "value": "6"},
    }
    pair, fmt = read_one(tmp_path, row)
    assert fmt == "sharegpt_pairs"
    assert (pair.prompt, pair.chosen, pair.rejected) == ((U,), (A5,), (A6,))
    row = {"instruction": "Add.", "input": "2 3", "chosen": "5", "rejected": "6"}
    pair, fmt = read_one(tmp_path, row, "a.jsonl")
    assert fmt == "alpaca_pairs"
    assert pair.prompt == ({"role": "user", "content": "Add.\n\n2 3"},)
    assert (pair.chosen, pair.rejected) == ((A5,), (A6,))


def test_kto_rows_and_a_label_that_is_not_a_boolean(tmp_path):
    rows = [
        {"prompt": "Add 2 and 3.", "completion": "5", "label": True},
        {"prompt": [U], "completion": [A6], "label": False},
        {"prompt": "Add 2 and 3.", "completion": "5", "label": "yes"},
    ]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    skipped = []
    items, fmt = read_preferences(path, skipped=skipped)
    assert fmt == "kto"
    assert items == [
        Labelled((U,), (A5,), True, f"{path}:1", {}),
        Labelled((U,), (A6,), False, f"{path}:2", {}),
    ]
    assert skipped == [
        {
            "where": f"{path}:3",
            "reason": f"{path}:3: field 'label' must be true (desirable) or false "
            "(undesirable), got 'yes'",
        }
    ]
    with pytest.raises(InstillError, match=r"k\.jsonl:3: field 'label' must be true"):
        read_preferences(path)


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same reply"),
        ({"prompt": "p", "chosen": [A5], "rejected": [A5]}, "are the same reply"),
        ({"chosen": [U, A5], "rejected": [U, A5]}, "are the same reply"),
        ({"prompt": "p", "chosen": "a", "rejected": "  "}, "field 'rejected' is empty"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
        ({"prompt": "p", "chosen": [], "rejected": "b"}, "field 'chosen' is empty"),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"},
            "field 'rejected' message 1: empty assistant reply",
        ),
        ({"prompt": [U, A5], "chosen": "a", "rejected": "b"}, "ends on an assistant turn"),
        ({"prompt": "p", "chosen": [U, A5], "rejected": "b"}, "starts with a user turn"),
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),  # format from line 1
        ({"question": "p", "answer": "a"}, "cannot detect a preference format from keys"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"} if "prompt" in row else None
    rows = [good, row] if good else [row]
    line = len(rows)
    with pytest.raises(InstillError, match=rf"p\.jsonl:{line}: .*{message}"):
        read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))


def test_supervised_detection_refuses_preference_rows(tmp_path):
    with pytest.raises(InstillError, match="is a preference pair"):
        detect_format({"prompt": "p", "chosen": "a", "rejected": "b"})
    with pytest.raises(InstillError, match="is a labelled completion"):
        detect_format({"prompt": "p", "completion": "c", "label": False})
    # a label that is not a boolean is some other column: the row stays a supervised one
    assert detect_format({"prompt": "p", "completion": "c", "label": "sports"}) == (
        "prompt_completion"
    )
    f = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(InstillError, match=r"k\.jsonl:1: this row is a labelled completion"):
        build_data(None, DataConfig(sources=[SourceConfig(path=f)]), cache=False)
    assert detect_preference_format({"prompt": "p", "completion": "c", "label": True}) == "kto"


def test_pair_renders_prompt_once_and_each_reply_with_its_mask(tokenizer):
    pair = Pair((SYSTEM, U), (A5,), ({"role": "assistant", "content": "It is 6."},), "f:1")
    (row,), stats = tokenize_preferences(tokenizer, [pair], max_length=64)
    # the reply "5" and its end-of-turn token; the newline the template writes after it is
    # dropped (no loss on it, no compute spent on it)
    assert row == PairRow(PROMPT_IDS, [37, IM_END], [1, 1], [1589, 314, 216, 38, 30, IM_END],
                          [1] * 6, "f:1")  # fmt: skip
    ids, mask = row.chosen()
    assert ids == PROMPT_IDS + [37, IM_END]
    assert mask == [0] * len(PROMPT_IDS) + [1, 1]
    assert (stats.rows, stats.tokens, stats.trained_tokens, stats.truncated) == (1, 32, 8, 0)


def test_prompt_assistant_turns_carry_no_loss(tokenizer):
    hi = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})
    (row,), _ = tokenize_preferences(tokenizer, [Pair((*hi, U), (A5,), (A6,), "f:2")], 128)
    for ids, mask in (row.chosen(), row.rejected()):
        assert ids[: len(row.prompt_ids)] == row.prompt_ids
        assert mask[: len(row.prompt_ids)] == [0] * len(row.prompt_ids)  # "Hello" is not trained
    assert tokenizer.decode(row.prompt_ids).count("Hello") == 1
    assert (row.chosen_ids, row.rejected_ids) == ([37, IM_END], [38, IM_END])


def test_labelled_rows_and_unpaired_pairs(tokenizer):
    items = unpaired([Pair((SYSTEM, U), (A5,), (A6,), "f:1")])
    assert [(x.completion, x.desirable) for x in items] == [((A5,), True), ((A6,), False)]
    rows, _ = tokenize_preferences(tokenizer, items, 64)
    assert rows == [
        LabelledRow(PROMPT_IDS, [37, IM_END], [1, 1], True, "f:1"),
        LabelledRow(PROMPT_IDS, [38, IM_END], [1, 1], False, "f:1"),
    ]
    assert rows[1].sequence() == (PROMPT_IDS + [38, IM_END], [0] * len(PROMPT_IDS) + [1, 1])


def test_replies_are_cut_to_fit_max_length(tokenizer):
    pair = Pair((SYSTEM, U), (A5,), ({"role": "assistant", "content": "It is 6."},), "f:1")
    (row,), stats = tokenize_preferences(tokenizer, [pair], max_length=len(PROMPT_IDS) + 3)
    assert (row.chosen_ids, row.rejected_ids, row.rejected_mask) == (
        [37, IM_END],
        [1589, 314, 216],
        [1, 1, 1],
    )
    assert stats.truncated == 1


def test_a_prompt_leaving_no_room_is_an_error_counting_rows(tokenizer):
    short = Pair((SYSTEM, {"role": "user", "content": "Hi"}), (A5,), (A6,), "f:1")
    long = Pair((SYSTEM, U), (A5,), (A6,), "f:2")
    with pytest.raises(InstillError) as exc:
        tokenize_preferences(tokenizer, [short, long, long], max_length=len(PROMPT_IDS))
    assert str(exc.value) == (
        f"2 of 3 preference rows have a prompt of {len(PROMPT_IDS)} tokens or more, which "
        f"leaves no room for a reply within data.max_length={len(PROMPT_IDS)} (first: f:2); "
        "raise data.max_length, shorten those prompts, or skip them (data.on_error: skip "
        "lists them in the run's skipped_rows.jsonl)"
    )
    skipped = []  # data.on_error: skip: each such row listed, never silently dropped
    rows, _ = tokenize_preferences(
        tokenizer, [short, long, long], max_length=len(PROMPT_IDS), skipped=skipped
    )
    assert [r.source for r in rows] == ["f:1"]
    reason = f"the prompt leaves no room for a reply within data.max_length={len(PROMPT_IDS)}"
    assert skipped == [{"where": "f:2", "reason": reason}] * 2


def test_template_refusal_is_skipped_or_raised(tokenizer):
    # SmolLM2's template accepts any role; a template that raises on a role is refused per row
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    good, bad = Pair((U,), (A5,), (A6,), "f:1"), Pair((SYSTEM, U), (A5,), (A6,), "f:2")
    skipped = []
    rows, _ = tokenize_preferences(tok, [good, bad], 64, skipped)
    assert [r.source for r in rows] == ["f:1"]
    assert [s["where"] for s in skipped] == ["f:2"]
    assert "chat template refused" in skipped[0]["reason"]
    with pytest.raises(InstillError, match="f:2: the chat template refused"):
        tokenize_preferences(tok, [good, bad], 64)


def test_a_template_that_rewrites_the_prompt_is_refused(tokenizer):
    # the generation prompt differs from how the template opens an assistant turn, so the
    # prompt's tokens are not a prefix of prompt + reply
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(InstillError, match="f:1: chat template is not prefix-stable"):
        tokenize_preferences(tok, [Pair((U,), (A5,), (A6,), "f:1")], 64)
