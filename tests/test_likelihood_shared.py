"""Choice scoring with each shared prefix computed once (eval/likelihood.py: a KV cache of the
start every row shares, then each question's prompt and options packed as one prefix tree)
gives the row-by-row scores, and really computes each prefix once."""

from __future__ import annotations

import random

import pytest
import torch

from instill.eval.likelihood import (
    choose,
    masked_logprobs,
    reply_rows,
    shared_prefix_logprobs,
    shares_prefixes,
)

# Questions whose rendered prompts differ in length (a system turn, an earlier exchange), with
# options of different lengths: one a prefix of another ("Paris" / "Paris, France"), one whose
# first token differs only by a leading space, an empty one (nothing scored) and a long one.
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Pick a colour."},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Which number is even, of these few numbers I give you?"},
    ],
]
CHOICES = [
    ["Paris", "Paris, France", " Paris", "Lyon"],
    ["blue", "", "a very dark shade of green, almost black"],
    ["7", "12", "twelve thousand and one"],
]


def _row_by_row(model, tokenizer, prompts, choices):
    """The reference: every option's row scored alone (batch 1), as before the sharing."""
    flat = [
        [*p, {"role": "assistant", "content": c}]
        for p, cs in zip(prompts, choices, strict=True)
        for c in cs
    ]
    rows = reply_rows(tokenizer, flat, include_end=False)
    return rows, masked_logprobs(model, rows, tokenizer.pad_token_id, batch_size=1)


def _groups(rows, choices):
    out, k = [], 0
    for options in choices:
        out.append(rows[k : k + len(options)])
        k += len(options)
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("tokens_per_pass", [1, 40, 10_000])
def test_shared_scores_equal_row_by_row(tiny, tokenizer, attention, tokens_per_pass):
    """Each question alone per pass (1), some together (40), all in one pass (10,000): the same
    scores and token counts as each row alone, within 1e-4, with both attention kernels."""
    tiny.set_attn_implementation(attention)
    assert shares_prefixes(tiny)
    rows, want = _row_by_row(tiny, tokenizer, PROMPTS, CHOICES)
    got = shared_prefix_logprobs(tiny, _groups(rows, CHOICES), tokens_per_pass=tokens_per_pass)
    got = [s for group in got for s in group]
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
    assert want[5].tokens == 0 and got[5].logprob == 0.0  # the empty option: nothing scored


def test_choose_scores_equal_row_by_row(chatty, tokenizer):
    """choose() through the shared path: the per-byte scores and picks of the row-by-row
    log-probabilities (the untied tiny model, whose scores differ by option)."""
    rows, want = _row_by_row(chatty, tokenizer, PROMPTS, CHOICES)
    got = choose(chatty, tokenizer, PROMPTS, CHOICES)
    k = 0
    for options, (best, scores) in zip(CHOICES, got, strict=True):
        mine = [
            s.logprob / max(1, len(o.encode()))
            for s, o in zip(want[k : k + len(options)], options, strict=True)
        ]
        k += len(options)
        assert scores == pytest.approx(mine, abs=1e-4)
        assert best == max(range(len(mine)), key=mine.__getitem__)


def test_arbitrary_rows_and_masks(tiny):
    """Rows that share no start, masks with gaps and on the first token (never scored: nothing
    predicts it), rows with nothing scored, groups sharing long prefixes: row-by-row scores."""
    rng = random.Random(0)
    groups = []
    for _ in range(5):
        stem = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 12))]
        group = []
        for _ in range(rng.randrange(1, 4)):
            ids = stem + [rng.randrange(1, 500) for _ in range(rng.randrange(0, 7))]
            mask = [rng.random() < 0.5 for _ in ids]
            group.append((ids, [int(m) for m in mask]))
        groups.append(group)
    groups[0].append(([5, 6, 7], [0, 0, 0]))
    groups[1].append(([9], [1]))
    rows = [r for group in groups for r in group]
    want = masked_logprobs(tiny, rows, 0, batch_size=1)
    got = [s for group in shared_prefix_logprobs(tiny, groups, tokens_per_pass=16) for s in group]
    assert [s.tokens for s in got] == [s.tokens for s in want]
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)


def test_each_prefix_is_computed_once(tiny, tokenizer):
    """The model's embedding sees the start all rows share once, then, per pass, each distinct
    prefix that predicts a scored token once: the template's system turn and each question's
    prompt are not run again per option. Counted against the rows' own tokens."""
    prompts, choices = [PROMPTS[0], PROMPTS[2]], [CHOICES[0], CHOICES[2]]  # the default system
    rows, _ = _row_by_row(tiny, tokenizer, prompts, choices)
    seen: list[int] = []
    hook = tiny.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].shape[1])
    )
    try:
        shared_prefix_logprobs(tiny, _groups(rows, choices), tokens_per_pass=10_000)
    finally:
        hook.remove()
    live = [(ids, [j for j in range(1, len(ids)) if m[j]]) for ids, m in rows]
    live = [(ids, s) for ids, s in live if s]
    start = 0
    while all(len(ids) > start and ids[start] == live[0][0][start] for ids, _ in live):
        start += 1
    start = min(start, min(s[0] for _, s in live) - 1)
    prefixes = {tuple(ids[: k + 1]) for ids, s in live for k in range(start, s[-1])}
    assert seen == [start, len(prefixes)]
    assert start > 10  # SmolLM2's system turn
    assert sum(seen) < sum(len(ids) for ids, _ in rows) / 2


def test_flash_attention_scores_row_by_row(tiny, tokenizer, monkeypatch):
    """A kernel that takes no 4D mask (flash attention) is scored row by row, to the same
    scores."""
    monkeypatch.setattr(tiny.config, "_attn_implementation", "flash_attention_2")
    assert not shares_prefixes(tiny)
    monkeypatch.undo()
    rows, want = _row_by_row(tiny, tokenizer, PROMPTS[:1], CHOICES[:1])

    def refuse(*_a, **_k):
        raise AssertionError("shared-prefix path taken")

    monkeypatch.setattr("instill.eval.likelihood.shares_prefixes", lambda _model: False)
    monkeypatch.setattr("instill.eval.likelihood.shared_prefix_logprobs", refuse)
    ((_, scores),) = choose(tiny, tokenizer, PROMPTS[:1], CHOICES[:1])
    want_scores = [
        s.logprob / max(1, len(o.encode())) for s, o in zip(want, CHOICES[0], strict=True)
    ]
    assert scores == pytest.approx(want_scores, abs=1e-5)


@torch.inference_mode()
def test_lora_model_scores_with_its_adapters(tiny, tokenizer):
    """A peft-wrapped model (the quickstart's tuned side) is scored with its adapters on."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    rows, want = _row_by_row(model, tokenizer, PROMPTS, CHOICES)
    got = shared_prefix_logprobs(model, _groups(rows, CHOICES))
    got = [s for group in got for s in group]
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
    with model.disable_adapter():
        _, plain = _row_by_row(model, tokenizer, PROMPTS, CHOICES)
    assert (
        max(abs(a.logprob - b.logprob) for a, b in zip(plain, want, strict=True)) > 1e-2
    )  # adapters matter


def test_a_first_row_with_nothing_scored_does_not_become_the_shared_start(tiny):
    """The shared start comes from the rows that are scored: a first row that scores nothing
    (and begins differently) changes no score."""
    start = [11, 12, 13, 14, 15]
    groups = [
        [([90, 91, 92, 93, 94, 95], [0, 0, 0, 0, 0, 0])],
        [(start + [20, 21], [0, 0, 0, 0, 0, 1, 1]), (start + [22], [0, 0, 0, 0, 0, 1])],
        [(start + [30, 31, 32], [0, 0, 0, 0, 0, 0, 1, 1])],
    ]
    rows = [r for group in groups for r in group]
    want = masked_logprobs(tiny, rows, 0, batch_size=1)
    got = [s for group in shared_prefix_logprobs(tiny, groups) for s in group]
    assert [s.tokens for s in got] == [0, 2, 1, 2]
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-4)
