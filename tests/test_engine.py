"""The generation engine itself: a row's logits are the same bits whatever shares its batch (and
the test fails when rows are not padded), capacity growth, template heads, adapters, refusals."""

from __future__ import annotations

import pytest
import torch

from instill.data.render import render_prompt
from instill.errors import InstillError
from instill.infer.engine import Engine, GenParams, Job

TARGET = [{"role": "user", "content": "Add 2 and 3, then tell me why."}]
OTHERS = [
    [{"role": "user", "content": "Tell me everything about the history of bread, " * 5}],
    [{"role": "user", "content": "y"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two words."}],
    [{"role": "user", "content": "List three rivers and three mountains, with their heights."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]


class Recording(Engine):
    """Keeps every logits row the sampler sees, by job."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[int, list[torch.Tensor]] = {}
        choose = self.sampler.choose

        def recorded(logits, first=0):
            for i in range(logits.shape[0]):
                job = self.rows[first + i].job
                self.seen.setdefault(id(job), []).append(logits[i].clone())
            return choose(logits, first)

        self.sampler.choose = recorded


def logits_of(
    model,
    tokenizer,
    convs,
    target_at: int,
    max_batch: int,
    row_block: int = 4,
    max_new: int = 16,
    **kw,
):
    jobs = [
        Job(render_prompt(tokenizer, c), GenParams(max_new_tokens=max_new), live=False)
        for c in convs
    ]
    engine = Recording(model, tokenizer, max_batch, row_block=row_block, **kw)
    engine.run(jobs)
    return engine.seen[id(jobs[target_at])], jobs[target_at].ids


COMPOSITIONS = [
    ([TARGET], 0, 1),
    ([OTHERS[0], TARGET], 1, 2),
    ([OTHERS[1], TARGET, OTHERS[2]], 1, 3),
    ([*OTHERS, TARGET], 5, 8),
    ([*OTHERS, TARGET], 5, 2),  # joins when a row frees, beside rows mid-reply
    ([OTHERS[4], OTHERS[3], TARGET, OTHERS[0]], 2, 3),
]


def test_a_rows_logits_are_the_same_bits_in_any_batch(tiny, tokenizer):
    alone, ids = logits_of(tiny, tokenizer, [TARGET], 0, 1)
    assert len(alone) == 16
    for convs, at, max_batch in COMPOSITIONS[1:]:
        got, got_ids = logits_of(tiny, tokenizer, convs, at, max_batch)
        assert got_ids == ids
        assert all(torch.equal(a, b) for a, b in zip(alone, got, strict=True)), (at, max_batch)


def test_unpadded_rows_are_not_batch_invariant(tiny, tokenizer):
    """Negative control: without padding to 4 rows a lone row takes other kernel paths."""
    alone, _ = logits_of(tiny, tokenizer, [TARGET], 0, 1, row_block=1)
    got, _ = logits_of(tiny, tokenizer, [*OTHERS, TARGET], 5, 8, row_block=1)
    assert not all(torch.equal(a, b) for a, b in zip(alone, got, strict=True))


def grown_mid_reply(model, tokenizer, capacity: int):
    """The target is admitted alone and decodes 4 tokens; then a long prompt is admitted beside
    it (the cache grows when it is too small), and both run to the end. Returns the target's
    logits and ids, and the cache's capacity before and after the long prompt came in."""
    target = Job(render_prompt(tokenizer, TARGET), GenParams(max_new_tokens=16), live=False)
    long = Job(render_prompt(tokenizer, OTHERS[0]), GenParams(max_new_tokens=8), live=False)
    engine = Recording(model, tokenizer, 2, capacity=capacity)
    with torch.inference_mode():
        engine.admit([target])
        for _ in range(4):
            engine._step()
        before = engine.cache.capacity
        engine.admit([long])
        after = engine.cache.capacity
        while engine.rows:
            engine._step()
            engine._drop()
    return engine.seen[id(target)], target.ids, (before, after)


def test_growing_the_cache_changes_nothing(tiny, tokenizer):
    """A cache that grows while a row is mid-reply (its prompt, its head copy and 4 generated
    tokens in the cache) keeps that row's keys and values: its logits are the same bits as
    when the cache was big enough from the start."""
    big, ids, (b0, b1) = grown_mid_reply(tiny, tokenizer, 1024)
    # 32 columns hold the template's 24-token head; the target (42 + 16) and the long prompt
    # (76 + 8) each grow the cache, the second time while the target is mid-reply.
    small, small_ids, (s0, s1) = grown_mid_reply(tiny, tokenizer, 32)
    assert b0 == b1 == 1024  # the reference never grows ...
    assert s0 < len(render_prompt(tokenizer, OTHERS[0])) < s1  # ... the other grows with data
    assert len(big) == len(small) == 16
    assert small_ids == ids and all(torch.equal(a, b) for a, b in zip(big, small, strict=True))


def test_prompts_with_and_without_the_template_head(tiny, tokenizer):
    """SmolLM2's template opens every prompt without a system turn with its default one: that
    head is computed once; a prompt with its own system turn is prefilled whole."""
    engine = Engine(tiny, tokenizer, 4)
    head_user = render_prompt(tokenizer, TARGET)
    own_system = render_prompt(tokenizer, OTHERS[2])
    engine.run([])
    assert engine._head_length(head_user) == len(engine.head) >= 8
    assert engine._head_length(own_system) == 0
    assert tokenizer.decode(engine.head).endswith("<|im_start|>user\n")


def test_a_model_with_a_lora_adapter_generates_as_transformers(tiny, tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for module in model.modules():  # a nonzero update, so the adapter matters
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.5)
    model.eval()
    prompt = render_prompt(tokenizer, TARGET)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=[2],
            pad_token_id=2,
        )
    job = Job(prompt, GenParams(max_new_tokens=12), live=False)
    Engine(model, tokenizer, 4).run([job])
    assert job.ids == out[0, ids.shape[1] :].tolist()


def test_a_model_with_other_than_full_attention_layers_is_refused(tiny, tokenizer):
    tiny.config.layer_types = ["full_attention", "sliding_attention"]
    try:
        with pytest.raises(InstillError, match="sliding_attention layers"):
            Engine(tiny, tokenizer, 2)
    finally:
        del tiny.config.layer_types


def test_an_empty_prompt_is_refused(tiny, tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        Engine(tiny, tokenizer, 2).run([Job([], GenParams(max_new_tokens=2), live=False)])


def test_logprobs_taken_while_decoding_equal_a_teacher_forced_pass(chatty, tokenizer):
    """Engine(logprobs=True) sums each chosen token's log-probability under the model as it
    decodes (a drift anchor's NLL then needs no second pass): the same sum as scoring the
    finished reply in one forward pass, for rows that end their turn, rows cut at their limit,
    rows that join and move slots mid-batch, and a sampled row (its tokens are scored under
    the model's own distribution, not the reshaped one it drew from)."""
    from instill.train.loss import masked_logprobs

    convs = [*OTHERS, TARGET]
    probe = Job(render_prompt(tokenizer, TARGET), GenParams(max_new_tokens=12), live=False)
    Engine(chatty, tokenizer, 4).run([probe])
    eot = probe.ids[4]  # a token the model writes, made its end of turn: some rows end on it
    lengths = (12, 3, 12, 7, 12, 12)
    params = [GenParams(max_new_tokens=n) for n in lengths]
    params[2] = GenParams(max_new_tokens=12, temperature=0.9, top_k=40, seed=3)
    jobs = [
        Job(render_prompt(tokenizer, c), p, live=False) for c, p in zip(convs, params, strict=True)
    ]
    Engine(chatty, tokenizer, 2, eot=[eot], logprobs=True).run(jobs)  # rows join and move
    assert any(j.end_of_turn == eot for j in jobs)
    assert any(j.finish_reason == "length" for j in jobs)
    rows = []
    for job in jobs:
        reply = job.ids + ([job.end_of_turn] if job.end_of_turn is not None else [])
        rows.append((job.prompt + reply, [0] * len(job.prompt) + [1] * len(reply)))
    forced = masked_logprobs(chatty, rows, tokenizer.pad_token_id, batch_size=3)
    for job, score in zip(jobs, forced, strict=True):
        assert job.logprob == pytest.approx(score.logprob, abs=1e-4)
    assert len({round(j.logprob, 3) for j in jobs}) == len(jobs)  # not one value for all rows
    plain = Job(render_prompt(tokenizer, TARGET), GenParams(max_new_tokens=4), live=False)
    Engine(chatty, tokenizer, 2).run([plain])
    assert plain.logprob is None  # off unless asked for
