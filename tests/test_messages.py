"""data.formats.instruction_text: the one instruction (+ input) -> user turn, shared by training
rows (Alpaca, Self-Instruct), eval suites' prompt rows and prompt files (drift, replay)."""

from __future__ import annotations

from instill.anchors import _row_prompt
from instill.data.formats import instruction_text, to_conversations
from instill.data.sources import RawRow
from instill.eval.tasks import _prompt_only


def test_instruction_text():
    assert instruction_text("Sum.", "2 3") == "Sum.\n\n2 3"
    assert instruction_text("Say hi.", "") == "Say hi."
    assert instruction_text("Say hi.", "  ") == "Say hi."
    assert instruction_text("Say hi.", None) == "Say hi."


def test_training_eval_and_prompt_files_render_an_instruction_alike():
    want = {"role": "user", "content": "Sum.\n\n2 3"}
    row = {"instruction": "Sum.", "input": "2 3"}
    (conv,) = to_conversations(RawRow({**row, "output": "5"}, "t.jsonl", 1), "alpaca")
    assert conv.messages[0] == want  # a training row
    (conv,) = to_conversations(
        RawRow({**row, "instances": [{"input": "2 3", "output": "5"}]}, "t.jsonl", 2),
        "selfinstruct",
    )
    assert conv.messages[0] == want  # a Self-Instruct instance
    assert _prompt_only(RawRow(row, "s.jsonl", 1)) == [want]  # an eval suite's prompt row
    assert _row_prompt(row) == [want]  # a prompt file's row (drift suites, replay prompts)
    # without input: the instruction alone everywhere
    assert _prompt_only(RawRow({"instruction": "Hi."}, "s.jsonl", 2))[0]["content"] == "Hi."
    assert _row_prompt({"instruction": "Hi.", "input": ""})[0]["content"] == "Hi."
