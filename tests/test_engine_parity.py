"""Every generation caller against plain transformers, pinned before the two engines became one.

- Greedy: eval (the runner and the drift suite's base replies), `instill generate`, chat and
  serve give the tokens that transformers' own greedy `generate` gives for the same prompt run
  alone, unpadded (the tiny model in fp32).
- Greedy output does not depend on what shares the batch (alone, in batches of other
  compositions, admitted while other rows are mid-reply).
- Seeded sampling: reproducible, the same whatever shares the batch, the same through every
  caller.
- Stop strings and incremental text, on a scripted model whose reply is fixed in advance:
  characters whose bytes are split across tokens are streamed whole, a stop string spanning
  tokens cuts the reply and is never streamed, the prompt never completes a stop string, the
  end-of-turn token ends the reply (kept in `token_ids`, not in the text or the count).
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instill.chat import ChatSession
from instill.config import EvalConfig
from instill.data.render import end_of_turn_ids, render_prompt
from instill.eval.runner import evaluate
from instill.eval.tasks import builtin_task
from instill.infer import GenParams, generate
from instill.infer.batch import generate_file
from instill.serve.scheduler import Job, Scheduler

CONVS = [
    [{"role": "user", "content": "Add 2 and 3."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour please, and say why you like it."},
    ],
    [{"role": "user", "content": "x"}],
    [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact about the sea in winter."},
    ],
]
N = 20  # new tokens: the tiny random model never ends a turn, so every reply has N
SAMPLED = GenParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=11)


@torch.inference_mode()
def hf_greedy(model, tokenizer, conv, n: int = N) -> list[int]:
    """transformers' own greedy decode of one unpadded prompt: the new tokens, up to and with
    the end-of-turn token."""
    ids = torch.tensor([render_prompt(tokenizer, conv)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def text_of(tokenizer, ids: list[int]) -> str:
    eot = set(end_of_turn_ids(tokenizer))
    return tokenizer.decode([t for t in ids if t not in eot], skip_special_tokens=True)


def scheduler(model, tokenizer, max_batch: int = 8) -> Scheduler:
    return Scheduler(model, tokenizer, max_batch)


def run_jobs(sched, tokenizer, convs, params, **kw) -> list[Job]:
    jobs = [sched.submit(Job(render_prompt(tokenizer, c), params, **kw)) for c in convs]
    assert all(j.done.wait(60) for j in jobs)
    assert all(j.error is None for j in jobs), [j.error for j in jobs]
    return jobs


@pytest.fixture(scope="module")
def model(tokenizer):
    from conftest import build_tiny

    # untied: its replies differ by prompt (the tied model answers every prompt with newlines,
    # so a reply given to the wrong row would match)
    return build_tiny(tokenizer, seed=3, tied=False)


@pytest.fixture(scope="module")
def want(model, tokenizer):
    replies = [hf_greedy(model, tokenizer, c) for c in CONVS]
    assert len({tuple(r) for r in replies}) == len(CONVS)
    return replies


# --- greedy: every caller gives transformers' tokens ------------------------------------------


def test_generate_batched_greedy_equals_transformers_alone(model, tokenizer, want):
    gens = generate(model, tokenizer, CONVS, GenParams(max_new_tokens=N), batch_size=4)
    assert [list(g.token_ids) for g in gens] == want
    assert [g.text for g in gens] == [text_of(tokenizer, w) for w in want]
    assert [g.completion_tokens for g in gens] == [N] * len(CONVS)
    assert [g.prompt_tokens for g in gens] == [len(render_prompt(tokenizer, c)) for c in CONVS]
    assert {g.finish_reason for g in gens} == {"length"}


def test_eval_greedy_equals_transformers(model, tokenizer):
    task = builtin_task(
        1, 0, ["addition", "uppercase", "json_person", "word_limit", "table_lookup"]
    )
    result = evaluate(model, tokenizer, task, EvalConfig(batch_size=3, max_new_tokens=12), "m")
    for ex, record in zip(task.examples, result.records, strict=True):
        assert record["prediction"] == text_of(
            tokenizer, hf_greedy(model, tokenizer, ex.prompt, 12)
        )


def test_drift_base_replies_equal_transformers(model, tokenizer):
    from instill.anchors import base_replies
    from instill.eval.tasks import EvalExample

    prompts = [EvalExample(id=str(i), prompt=tuple(c), reference="") for i, c in enumerate(CONVS)]
    anchor = base_replies(model, tokenizer, prompts, 10, batch_size=3, digest="d", cache=False)
    for p in prompts:
        ids = hf_greedy(model, tokenizer, list(p.prompt), 10)
        assert list(anchor.replies[p.id].ids) == ids
        assert anchor.replies[p.id].text == text_of(tokenizer, ids)


def test_generate_file_equals_transformers(model, tokenizer, want, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    generate_file(model, tokenizer, src, dst, GenParams(max_new_tokens=N), batch_size=3)
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["output"] for r in rows] == [text_of(tokenizer, w) for w in want]
    assert [r["completion_tokens"] for r in rows] == [N] * len(CONVS)


def test_chat_equals_transformers_turn_by_turn(model, tokenizer):
    chat = ChatSession(model, tokenizer, system="Be brief.", max_new_tokens=N)
    for text in ("Hi there.", "And what about tomorrow?"):
        expected = text_of(tokenizer, hf_greedy(model, tokenizer, [*chat.messages(), _user(text)]))
        assert chat.reply(text, stream=False) == expected


def test_chat_streamed_equals_transformers(model, tokenizer, capsys):
    chat = ChatSession(model, tokenizer, max_new_tokens=N)
    expected = text_of(tokenizer, hf_greedy(model, tokenizer, [_user("Hi there.")]))
    capsys.readouterr()
    assert chat.reply("Hi there.", stream=True) == expected
    assert capsys.readouterr().out == expected


def test_scheduler_greedy_equals_transformers(model, tokenizer, want):
    sched = scheduler(model, tokenizer, max_batch=3)  # four jobs: one waits for a free row
    try:
        jobs = run_jobs(sched, tokenizer, CONVS, GenParams(max_new_tokens=N))
    finally:
        sched.close()
    assert [j.ids for j in jobs] == want
    assert [j.text for j in jobs] == [text_of(tokenizer, w) for w in want]


def test_server_greedy_equals_transformers(model, tokenizer, want):
    import httpx
    from test_serve import start

    from instill.serve import ServeConfig

    base, _, stop = start(model, tokenizer, ServeConfig())
    try:
        for conv, ids in zip(CONVS, want, strict=True):
            body = {"messages": conv, "max_tokens": N}
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
            assert r["choices"][0]["message"]["content"] == text_of(tokenizer, ids)
            assert r["usage"]["completion_tokens"] == N
    finally:
        stop()


# --- greedy: the batch does not change a reply -------------------------------------------------

OTHERS = [
    [{"role": "user", "content": "Tell me everything about the history of bread, " * 6}],
    [{"role": "user", "content": "y"}],
    [{"role": "user", "content": "Two words."}],
    [{"role": "user", "content": "List three rivers and three mountains, with their heights."}],
]


@pytest.mark.parametrize(
    "companions,batch_size",
    [([], 1), (OTHERS[:1], 2), (OTHERS[1:2], 2), (OTHERS, 8), (OTHERS + CONVS[1:], 3)],
)
def test_generate_greedy_reply_is_the_same_in_any_batch(model, tokenizer, companions, batch_size):
    target = CONVS[0]
    alone = hf_greedy(model, tokenizer, target, 24)
    gens = generate(
        model, tokenizer, [*companions, target], GenParams(max_new_tokens=24), batch_size=batch_size
    )
    assert list(gens[-1].token_ids) == alone


def test_scheduler_greedy_reply_is_the_same_when_it_joins_mid_batch(model, tokenizer):
    target = CONVS[1]
    alone = hf_greedy(model, tokenizer, target, 24)
    sched = scheduler(model, tokenizer, max_batch=4)
    joined = {}

    def join(_text):  # the long job is decoding: the target joins the running batch now
        if "job" not in joined:
            joined["job"] = sched.submit(
                Job(render_prompt(tokenizer, target), GenParams(max_new_tokens=24))
            )

    try:
        long = [
            sched.submit(Job(render_prompt(tokenizer, OTHERS[0]), GenParams(max_new_tokens=40))),
            sched.submit(
                Job(render_prompt(tokenizer, OTHERS[1]), GenParams(max_new_tokens=30), on_text=join)
            ),
        ]
        assert all(j.done.wait(60) for j in long)
        assert joined["job"].done.wait(60)
    finally:
        sched.close()
    assert joined["job"].ids == alone


# --- seeded sampling ----------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_in_each_caller(model, tokenizer):
    a, b = (generate(model, tokenizer, CONVS[:1], SAMPLED)[0] for _ in range(2))
    assert a.token_ids == b.token_ids
    sched = scheduler(model, tokenizer)
    try:
        c, d = (run_jobs(sched, tokenizer, CONVS[:1], SAMPLED)[0] for _ in range(2))
    finally:
        sched.close()
    assert c.ids == d.ids and len(c.ids) == 12


@torch.inference_mode()
def hf_sampled(model, tokenizer, conv, params: GenParams) -> list[int]:
    """transformers' own sampling of one unpadded prompt after torch.manual_seed(seed)."""
    ids = torch.tensor([render_prompt(tokenizer, conv)])
    torch.manual_seed(params.seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=params.max_new_tokens,
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0: none (unset, transformers would apply 50)
        repetition_penalty=params.repetition_penalty,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


SAMPLINGS = [
    SAMPLED,
    GenParams(max_new_tokens=16, temperature=1.3, seed=0),
    GenParams(max_new_tokens=16, temperature=0.8, top_p=0.5, seed=123),
    GenParams(max_new_tokens=16, temperature=1.0, top_k=5, repetition_penalty=1.5, seed=9),
]


@pytest.mark.parametrize("params", SAMPLINGS)
def test_generate_seeded_sample_of_one_prompt_equals_transformers_sampling(
    model, tokenizer, params
):
    """One prompt alone: the same draws as transformers' sampling seeded with the same seed."""
    want = hf_sampled(model, tokenizer, CONVS[1], params)
    assert list(generate(model, tokenizer, CONVS[1:2], params)[0].token_ids) == want


@pytest.mark.parametrize("params", SAMPLINGS)
def test_scheduler_seeded_sample_of_one_prompt_equals_transformers_sampling(
    model, tokenizer, params
):
    want = hf_sampled(model, tokenizer, CONVS[1], params)
    sched = scheduler(model, tokenizer)
    try:
        assert run_jobs(sched, tokenizer, CONVS[1:2], params)[0].ids == want
    finally:
        sched.close()


def test_greedy_with_a_repetition_penalty_equals_transformers(model, tokenizer):
    params = GenParams(max_new_tokens=N, repetition_penalty=1.4)
    ids = torch.tensor([render_prompt(tokenizer, CONVS[1])])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N,
            do_sample=False,
            repetition_penalty=1.4,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    want = out[0, ids.shape[1] :].tolist()
    assert list(generate(model, tokenizer, CONVS[1:2], params)[0].token_ids) == want
    sched = scheduler(model, tokenizer)
    try:
        assert run_jobs(sched, tokenizer, CONVS[1:2], params)[0].ids == want
    finally:
        sched.close()


def test_top_k_one_sampling_is_greedy(model, tokenizer, want):
    params = GenParams(max_new_tokens=N, temperature=0.7, top_k=1, seed=5)
    assert list(generate(model, tokenizer, CONVS[:1], params)[0].token_ids) == want[0]
    sched = scheduler(model, tokenizer)
    try:
        assert run_jobs(sched, tokenizer, CONVS[:1], params)[0].ids == want[0]
    finally:
        sched.close()


def test_scheduler_seeded_sample_is_the_same_beside_other_rows(model, tokenizer):
    sched = scheduler(model, tokenizer)
    try:
        alone = run_jobs(sched, tokenizer, CONVS[:1], SAMPLED)[0]
        jobs = [
            sched.submit(Job(render_prompt(tokenizer, c), p))
            for c, p in [
                (OTHERS[0], GenParams(max_new_tokens=20)),
                (CONVS[0], SAMPLED),
                (OTHERS[1], SAMPLED),
            ]
        ]
        assert all(j.done.wait(60) for j in jobs)
    finally:
        sched.close()
    assert jobs[1].ids == alone.ids


def test_generate_seeded_sample_is_the_same_beside_other_rows(model, tokenizer):
    alone = generate(model, tokenizer, CONVS[:1], SAMPLED)[0]
    together = generate(model, tokenizer, [OTHERS[1], CONVS[0]], SAMPLED, batch_size=2)[1]
    assert together.token_ids == alone.token_ids


def test_seeded_sampling_is_the_same_through_every_caller(model, tokenizer, tmp_path):
    import httpx
    from test_serve import start

    from instill.serve import ServeConfig

    via_generate = generate(model, tokenizer, CONVS[:1], SAMPLED)[0]
    chat = ChatSession(model, tokenizer)
    chat.params = SAMPLED
    assert chat.reply(CONVS[0][0]["content"], stream=False) == via_generate.text
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"messages": CONVS[0]}) + "\n")
    generate_file(model, tokenizer, src, dst, SAMPLED)
    assert json.loads(dst.read_text())["output"] == via_generate.text
    base, _, stop = start(model, tokenizer, ServeConfig())
    try:
        body = {
            "messages": CONVS[0],
            "max_tokens": 12,
            "temperature": 0.9,
            "top_p": 0.9,
            "top_k": 40,
            "seed": 11,
        }
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60).json()
    finally:
        stop()
    assert r["choices"][0]["message"]["content"] == via_generate.text


# --- stop strings and incremental text, on a scripted model -----------------------------------


class Scripted(LlamaForCausalLM):
    """A tiny Llama whose reply is fixed: the logits predicting absolute position p pick
    `script[p]` (positions not in the script keep the model's own logits)."""

    script: dict[int, int] = {}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        logits, keep = out.logits, kwargs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):  # these positions' logits
            predicted = position_ids[:, keep] + 1
        else:  # the last ones
            predicted = position_ids[:, -logits.shape[1] :] + 1
        for b in range(logits.shape[0]):
            for j in range(logits.shape[1]):
                tid = self.script.get(int(predicted[b, j]))
                if tid is not None:
                    logits[b, j] = -1e4
                    logits[b, j, tid] = 1e4
        return out


def scripted(tokenizer, conv, reply_ids: list[int]) -> Scripted:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Scripted(config).eval()
    start = len(render_prompt(tokenizer, conv))
    model.script = {start + i: t for i, t in enumerate(reply_ids)}
    return model


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def both_paths(model, tokenizer, conv, params):
    """(generate's Generation with its streamed pieces, the scheduler's Job with its pieces)."""
    pieces_g: list[str] = []
    gen = generate(model, tokenizer, [conv], params, on_text=pieces_g.append)[0]
    pieces_s: list[str] = []
    sched = scheduler(model, tokenizer)
    try:
        job = run_jobs(sched, tokenizer, [conv], params, on_text=pieces_s.append)[0]
    finally:
        sched.close()
    return (gen, pieces_g), (job, pieces_s)


MULTIBYTE = "Caf\u00e9 \U0001f642\U0001f680 \u65e5\u672c\u8a9e ok"


def test_the_scripted_text_splits_characters_across_tokens(tokenizer):
    ids = _ids(tokenizer, MULTIBYTE)
    assert tokenizer.decode(ids) == MULTIBYTE
    partial = [i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd")]
    assert len(partial) >= 3  # several prefixes end inside a character


def test_characters_split_across_tokens_are_streamed_whole(tokenizer):
    conv = [_user("Say it.")]
    ids = _ids(tokenizer, MULTIBYTE)
    model = scripted(tokenizer, conv, ids)
    for reply, pieces in both_paths(model, tokenizer, conv, GenParams(max_new_tokens=len(ids))):
        assert reply.text == MULTIBYTE and reply.finish_reason == "length"
        assert "".join(pieces) == MULTIBYTE
        assert not any("\ufffd" in p for p in pieces)
        assert len(pieces) > 3


STOP_TEXT = "The answer is 42. Done here, more text."


def _spanning_stop(tokenizer, text: str) -> str:
    """A stop string that starts inside one token and ends inside the next."""
    ids = _ids(tokenizer, text)
    pieces = [tokenizer.decode([t]) for t in ids]
    for i in range(2, len(pieces) - 1):
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2:
            return pieces[i][-1] + pieces[i + 1][:2]
    raise AssertionError("no two adjacent multi-character tokens")


def test_a_stop_string_spanning_tokens_cuts_the_reply(tokenizer):
    conv = [_user("Answer.")]
    ids = _ids(tokenizer, STOP_TEXT)
    stop = _spanning_stop(tokenizer, STOP_TEXT)
    cut = STOP_TEXT[: STOP_TEXT.index(stop)]
    done = next(i for i in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:i]))
    model = scripted(tokenizer, conv, ids)
    params = GenParams(max_new_tokens=len(ids), stop=("never", stop))
    (gen, _), (job, pieces) = both_paths(model, tokenizer, conv, params)
    for reply in (gen, job):
        assert reply.text == cut and reply.finish_reason == "stop"
    assert gen.completion_tokens == len(job.ids) == done  # up to the token completing the stop
    assert "".join(pieces) == cut  # the server's stream never showed the stop or what follows


def test_generate_streams_no_text_past_a_stop_string(tokenizer):
    conv = [_user("Answer.")]
    ids = _ids(tokenizer, STOP_TEXT)
    stop = _spanning_stop(tokenizer, STOP_TEXT)
    model = scripted(tokenizer, conv, ids)
    (gen, pieces), _ = both_paths(model, tokenizer, conv, GenParams(len(ids), stop=(stop,)))
    assert "".join(pieces) == gen.text


def test_a_stop_string_inside_a_split_character_is_never_streamed_in_part(tokenizer):
    conv = [_user("Say it.")]
    ids = _ids(tokenizer, MULTIBYTE)
    model = scripted(tokenizer, conv, ids)
    params = GenParams(max_new_tokens=len(ids), stop=("\U0001f680",))
    (gen, _), (job, pieces) = both_paths(model, tokenizer, conv, params)
    for reply in (gen, job):
        assert reply.text == "Caf\u00e9 \U0001f642" and reply.finish_reason == "stop"
    assert "".join(pieces) == "Caf\u00e9 \U0001f642"


def test_the_prompt_never_completes_a_stop_string(tokenizer):
    conv = [_user("Go.")]  # the generation prompt ends in a newline
    assert tokenizer.decode(render_prompt(tokenizer, conv)).endswith("\n")
    ids = _ids(tokenizer, "\nYes, a line.")
    model = scripted(tokenizer, conv, ids)
    params = GenParams(max_new_tokens=len(ids), stop=("\n\n",))
    for reply, pieces in both_paths(model, tokenizer, conv, params):
        assert reply.text == "\nYes, a line." and reply.finish_reason == "length"
        assert "".join(pieces) == reply.text


def test_end_of_turn_ends_the_reply_and_stays_in_token_ids(tokenizer):
    conv = [_user("Hi.")]
    eot = end_of_turn_ids(tokenizer)[-1]
    words = _ids(tokenizer, "Hello there")
    model = scripted(tokenizer, conv, [*words, eot, *_ids(tokenizer, " after")])
    params = GenParams(max_new_tokens=10)
    (gen, pieces_g), (job, pieces_s) = both_paths(model, tokenizer, conv, params)
    for reply, pieces in ((gen, pieces_g), (job, pieces_s)):
        assert reply.text == "Hello there" and reply.finish_reason == "stop"
        assert "".join(pieces) == "Hello there"
    assert gen.completion_tokens == len(words) and list(gen.token_ids) == [*words, eot]
    assert job.ids == words


def test_a_row_that_ends_early_keeps_its_reply_in_a_batch(tokenizer):
    conv = [_user("Hi.")]
    eot = end_of_turn_ids(tokenizer)[-1]
    words = _ids(tokenizer, "Hello there")
    model = scripted(tokenizer, conv, [*words, eot])
    other = [_user("Hi, how are you doing this fine morning?")]  # longer: its own positions
    gens = generate(model, tokenizer, [other, conv, other], GenParams(max_new_tokens=8))
    assert gens[1].text == "Hello there" and gens[1].finish_reason == "stop"
    assert list(gens[1].token_ids) == [*words, eot]
    assert [g.completion_tokens for g in gens] == [8, len(words), 8]


def test_a_cancelled_job_stops_and_others_go_on(model, tokenizer, want):
    sched = scheduler(model, tokenizer)
    gate = threading.Event()
    try:
        victim = sched.submit(
            Job(
                render_prompt(tokenizer, OTHERS[0]),
                GenParams(max_new_tokens=200),
                on_text=lambda _t: gate.set(),
            )
        )
        gate.wait(30)
        victim.cancelled.set()
        (job,) = run_jobs(sched, tokenizer, CONVS[:1], GenParams(max_new_tokens=N))
        assert victim.done.wait(30) and len(victim.ids) < 200
    finally:
        sched.close()
    assert job.ids == want[0]
