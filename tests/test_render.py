"""Exact tokens and masks on the real SmolLM2 tokenizer and chat template."""

import pytest

from instill.data.render import end_of_turn_ids, render, render_batch, render_prompt
from instill.errors import InstillError

IM_START, IM_END, NL = 1, 2, 198

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
]


def test_exact_ids_and_mask(tokenizer):
    ids, mask = render(tokenizer, CONV)
    assert ids == [
        1,
        9690,
        198,
        6077,
        5453,
        30,
        2,
        198,
        1,
        4093,
        198,
        7684,
        216,
        34,
        284,
        216,
        35,
        30,
        2,
        198,
        1,
        520,
        9531,
        198,
        37,
        2,
        198,
    ]
    # only the reply "5" and its end-of-turn token are trained; the newline after it is not
    assert mask == [0] * 24 + [1, 1, 0]
    assert [ids[i] for i, m in enumerate(mask) if m] == [37, IM_END]


def test_one_bos_and_no_doubling(tokenizer):
    ids, _ = render(tokenizer, CONV)
    # the template writes its own first token; the tokenizer adds nothing in front
    assert ids[0] == tokenizer.bos_token_id == IM_START and ids[1] != IM_START
    assert ids.count(IM_START) == 3  # one per rendered message


def test_default_system_prompt_is_masked(tokenizer):
    ids, mask = render(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    assert len(ids) == 34 and ids[:3] == [IM_START, 9690, NL]  # template's default system turn
    assert [i for i, m in zip(ids, mask, strict=True) if m] == [19556, IM_END]


def test_end_of_turn_ids(tokenizer):
    assert IM_END in end_of_turn_ids(tokenizer)


MULTI = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "d"},
]


def test_mask_policies(tokenizer):
    ids, every = render(tokenizer, MULTI, "assistant")
    _, last = render(tokenizer, MULTI, "last_assistant")
    _, everything = render(tokenizer, MULTI, "all")
    trained = lambda m: tokenizer.decode([i for i, x in zip(ids, m, strict=True) if x])  # noqa: E731
    assert trained(every) == "b<|im_end|>d<|im_end|>"
    assert trained(last) == "d<|im_end|>"
    assert sum(everything) == len(ids)


def test_batch_equals_single(tokenizer):
    batch = render_batch(tokenizer, [CONV, MULTI], "assistant")
    assert batch == [render(tokenizer, CONV), render(tokenizer, MULTI)]


def test_prompt_is_prefix_of_training_render(tokenizer):
    ids, mask = render(tokenizer, CONV)
    prompt = render_prompt(tokenizer, CONV[:-1])
    assert ids[: len(prompt)] == prompt and sum(mask[: len(prompt)]) == 0


def test_prefix_unstable_template_fails_loudly(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    # renders the last message differently from earlier ones: prefixes are not stable
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>LAST {% endif %}"
        "{{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>{% endif %}"
    )
    with pytest.raises(InstillError, match="not prefix-stable at message 1"):
        render(tok, MULTI[:2])
