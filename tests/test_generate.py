"""The one generation function: same answers batched or alone, streaming, stop strings. On the
untied tiny model (`chatty`), whose replies differ by prompt: the tied one answers every prompt
with newlines, so a mixed-up batch or an ignored stop string would go unseen."""

from dataclasses import replace

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


def test_greedy_matches_plain_transformers(chatty, tokenizer):
    params = GenParams(max_new_tokens=8)
    ours = generate(chatty, tokenizer, CONVS[:1], params)[0]
    prompt = torch.tensor([render_prompt(tokenizer, CONVS[0])])
    ref = chatty.generate(
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
    assert len(set(new)) > 2  # a reply of varied tokens, not one repeated
    assert ours.prompt_tokens == prompt.shape[1]
    assert ours.completion_tokens == len(new)


def test_batched_equals_one_at_a_time(chatty, tokenizer):
    params = GenParams(max_new_tokens=6)
    together = generate(chatty, tokenizer, CONVS, params, batch_size=3)
    alone = [generate(chatty, tokenizer, [c], params)[0] for c in CONVS]
    assert [g.text for g in together] == [g.text for g in alone]
    assert len({g.text for g in alone}) == 3  # each prompt its own reply
    assert [g.prompt_tokens for g in together] == [g.prompt_tokens for g in alone]


def test_streaming_pieces_add_up_to_the_reply(chatty, tokenizer):
    pieces = []
    gen = generate(
        chatty, tokenizer, CONVS[:1], GenParams(max_new_tokens=10), on_text=pieces.append
    )[0]
    assert "".join(pieces) == gen.text and len(pieces) > 1


def test_stop_string_cuts_the_reply(chatty, tokenizer):
    full = generate(chatty, tokenizer, CONVS[:1], GenParams(max_new_tokens=10))[0]
    assert full.finish_reason == "length" and len(full.text) > 3
    stop = full.text[2:4]
    cut = generate(chatty, tokenizer, CONVS[:1], GenParams(max_new_tokens=10, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(chatty, tokenizer):
    params = GenParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = generate(chatty, tokenizer, CONVS[:1], params)[0]
    b = generate(chatty, tokenizer, CONVS[:1], params)[0]
    assert a.text == b.text
    greedy = generate(chatty, tokenizer, CONVS[:1], GenParams(max_new_tokens=8))[0]
    other = generate(chatty, tokenizer, CONVS[:1], replace(params, seed=8))[0]
    assert a.text != greedy.text and a.text != other.text  # it did sample, and by the seed
