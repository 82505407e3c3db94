"""The one generation function: same answers batched or alone, streaming, stop strings."""

import torch

from instill.data.render import render_prompt
from instill.infer import GenParams, generate

CONVS = [
    [{"role": "user", "content": "Add 2 and 3."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour please."},
    ],
    [{"role": "user", "content": "x"}],
]


def test_greedy_matches_plain_transformers(tiny, tokenizer):
    params = GenParams(max_new_tokens=8)
    ours = generate(tiny, tokenizer, CONVS[:1], params)[0]
    prompt = torch.tensor([render_prompt(tokenizer, CONVS[0])])
    ref = tiny.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=[2],
        pad_token_id=2,
    )
    new = ref[0, prompt.shape[1] :].tolist()
    new = new[: new.index(2)] if 2 in new else new
    assert ours.text == tokenizer.decode(new, skip_special_tokens=True)
    assert ours.prompt_tokens == prompt.shape[1]
    assert ours.completion_tokens == len(new)


def test_batched_equals_one_at_a_time(tiny, tokenizer):
    params = GenParams(max_new_tokens=6)
    together = generate(tiny, tokenizer, CONVS, params, batch_size=3)
    alone = [generate(tiny, tokenizer, [c], params)[0] for c in CONVS]
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.prompt_tokens for g in together] == [g.prompt_tokens for g in alone]


def test_streaming_pieces_add_up_to_the_reply(tiny, tokenizer):
    pieces = []
    gen = generate(tiny, tokenizer, CONVS[:1], GenParams(max_new_tokens=10), on_text=pieces.append)[
        0
    ]
    assert "".join(pieces) == gen.text


def test_stop_string_cuts_the_reply(tiny, tokenizer):
    full = generate(tiny, tokenizer, CONVS[:1], GenParams(max_new_tokens=10))[0]
    assert full.finish_reason == "length" and len(full.text) > 3
    stop = full.text[2:4]
    cut = generate(tiny, tokenizer, CONVS[:1], GenParams(max_new_tokens=10, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(tiny, tokenizer):
    params = GenParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = generate(tiny, tokenizer, CONVS[:1], params)[0]
    b = generate(tiny, tokenizer, CONVS[:1], params)[0]
    assert a.text == b.text
