"""Exact token ids and masks for every input format on the real SmolLM2 tokenizer: one BOS
(the template's <|im_start|>), the prompt masked, the reply and its <|im_end|> trained."""

import json

import pytest

from instill.config import DataConfig, SourceConfig
from instill.data.dataset import build_data

SYSTEM = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
]  # the template's default system turn
USER_ADD = [1, 4093, 198, 7684, 216, 34, 284, 216, 35, 30, 2, 198]  # "Add 2 and 3."
USER_SUM = [1, 4093, 198, 13764, 30, 198, 198, 34, 216, 35, 2, 198]  # "Sum.\n\n2 3"
REPLY = [1, 520, 9531, 198, 37, 2, 198]  # assistant header, "5", <|im_end|>, "\n"
REPLY_MASK = [0, 0, 0, 0, 1, 1, 0]

CASES = {
    "messages": (
        {
            "messages": [
                {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "5"},
            ]
        },
        USER_ADD,
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "human", "value": "Add 2 and 3."},
                {"from": "gpt", "value": "5"},
            ]
        },
        USER_ADD,
    ),
    "alpaca": ({"instruction": "Sum.", "input": "2 3", "output": "5"}, USER_SUM),
    "prompt_completion": ({"prompt": "Add 2 and 3.", "completion": "5"}, USER_ADD),
    "selfinstruct": (
        {
            "id": "t",
            "name": "sum",
            "instruction": "Sum.",
            "instances": [{"input": "2 3", "output": "5"}],
        },
        USER_SUM,
    ),
}


def build(tokenizer, tmp_path, row, fmt="auto"):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(row) + "\n")
    cfg = DataConfig(sources=[SourceConfig(path=str(f), format=fmt)])
    return build_data(tokenizer, cfg, cache=False).train


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_exact_ids_and_mask_per_format(tokenizer, tmp_path, fmt):
    row, user = CASES[fmt]
    for given in ("auto", fmt):  # detected and explicit give the same tokens
        (out,) = build(tokenizer, tmp_path, row, given)
        assert out.input_ids == SYSTEM + user + REPLY
        assert out.mask == [0] * (len(SYSTEM) + len(user)) + REPLY_MASK
        assert out.input_ids.count(tokenizer.bos_token_id) == 3 and out.input_ids[1] != 1


def test_text_format_trains_every_token_and_ends_with_eos(tokenizer, tmp_path):
    (out,) = build(tokenizer, tmp_path, {"text": "The cat sat."})
    assert out.input_ids == [504, 2644, 2643, 30, 2]
    assert out.mask == [1, 1, 1, 1, 1]
