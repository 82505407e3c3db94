"""llama.cpp as one backend (infer/llamacpp.py): one function chooses the engine for eval and
serve, and one decode loop answers both, ending a reply as the torch engine does (end of turn,
max_new_tokens, stop strings, finish reasons).

The llama.cpp test runs a tiny Llama with the real SmolLM2 vocabulary written as GGUF (as
tests/test_gguf_deploy.py does), and the same model converted for torch.
"""

from __future__ import annotations

import pytest
import torch

from instill.errors import InstillError
from instill.infer import llamacpp
from instill.infer.llamacpp import choose_engine
from tests.test_gguf_deploy import _tiny_base, needs_llamacpp


@pytest.mark.parametrize(
    "engine, lora, int8, match",
    [
        ("vllm", None, False, r"^--engine vllm: choose torch or llama\.cpp$"),
        ("torch", "a.gguf", False, r"^--lora: .* add --engine llama\.cpp$"),
        ("llama.cpp", None, True, r"^--int8: applies to --engine torch"),
    ],
)
def test_the_engine_choice_refuses_what_the_other_engine_takes(engine, lora, int8, match):
    with pytest.raises(InstillError, match=match):
        choose_engine(engine, lora, int8=int8)


def test_the_engine_choice_accepts_each_engines_own_options():
    assert choose_engine("torch", None, int8=True) == "torch"
    assert choose_engine("llama.cpp", "a.gguf") == "llama.cpp"


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_eval_and_serve_choose_the_engine_through_the_one_function(command, capsys, monkeypatch):
    """Both commands ask choose_engine (no copy of its rules in the CLI): its answer is theirs."""
    from tests.test_cli import assert_user_error, run

    asked = []

    def refuse(engine, lora, **kw):
        asked.append((engine, lora, kw.get("int8", False)))
        raise InstillError("chosen here")

    monkeypatch.setattr(llamacpp, "choose_engine", refuse)
    code, _, err = run([command, "x.gguf", "--lora", "a.gguf"], capsys, monkeypatch)
    assert_user_error(code, err, "chosen here")
    assert asked == [("torch", "a.gguf", False)]


def _torch_reply(model, tokenizer, prompt: list[int], params, eot=None):
    """The torch engine's reply to one prompt (with `eot` as its end-of-turn tokens)."""
    from instill.infer.engine import Engine, Job

    job = Job(list(prompt), params, live=False)
    Engine(model, tokenizer, 1, eot=eot).run([job])
    return job


@needs_llamacpp
def test_eval_and_serve_decode_with_one_loop_that_ends_replies_as_the_torch_engine(
    tmp_path, tokenizer, default_source
):
    """For one prompt, eval's llama.cpp path (eval/gguf) and serve's (its decode thread) give
    the same tokens, text and finish reason, and so does the torch engine on the same weights:
    at the length limit ("length"), at a stop string (the text cut before it, "stop"), and at
    an end-of-turn token (left out of the text and the token count, "stop")."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from instill.config import EvalConfig
    from instill.eval.gguf import _generate
    from instill.eval.tasks import EvalExample, Task
    from instill.infer.engine import GenParams, Job
    from instill.serve.llamacpp import LlamaCppScheduler

    source = _tiny_base(tmp_path, tokenizer, default_source, "f32", 0.2, 0.2)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    engine, gguf_tok = llamacpp.open_target(
        llamacpp.target(source.gguf_path, None), None, n_ctx=2048
    )
    scheduler = LlamaCppScheduler(engine)
    msg = [{"role": "user", "content": "Name three primary colours."}]
    prompt = engine.chat_ids(gguf_tok, msg)
    task = Task("t", [EvalExample("a", tuple(msg), "")], "exact", max_new_tokens=12)

    def eval_path():
        [gen] = _generate(engine, gguf_tok, task, EvalConfig())[0]
        return gen

    def serve_path(params):
        pieces: list[str] = []
        job = scheduler.submit(Job(list(prompt), params, on_text=pieces.append))
        assert job.done.wait(60) and job.error is None
        assert "".join(pieces) == job.text  # what was streamed is the reply
        return job

    try:
        params = GenParams(max_new_tokens=12)
        gen, job = eval_path(), serve_path(params)
        torch_job = _torch_reply(model, tokenizer, prompt, params)
        full = list(gen.token_ids)
        assert len(full) == 12 and len(set(full)) > 3  # a varied reply, cut at the limit
        assert job.ids == torch_job.ids == full and job.end_of_turn is None
        assert gen.text == job.text == torch_job.text and len(gen.text) > 6
        assert gen.finish_reason == job.finish_reason == torch_job.finish_reason == "length"

        cut = gen.text[len(gen.text) // 2 : len(gen.text) // 2 + 2]
        stopped = replace(params, stop=(cut,))
        job, torch_job = serve_path(stopped), _torch_reply(model, tokenizer, prompt, stopped)
        assert job.text == torch_job.text == gen.text[: gen.text.find(cut)]
        assert job.finish_reason == torch_job.finish_reason == "stop"
        assert job.ids == torch_job.ids and len(job.ids) < 12  # stopped early, same tokens

        end = full[5]  # a token of the reply taken as the end of turn: the reply ends there
        engine.eot = {end}
        gen, job = eval_path(), serve_path(params)
        torch_job = _torch_reply(model, tokenizer, prompt, params, eot=[end])
        ids = full[: full.index(end)]
        assert list(gen.token_ids) == [*ids, end] and gen.completion_tokens == len(ids)
        assert job.ids == torch_job.ids == ids
        assert job.end_of_turn == torch_job.end_of_turn == end
        assert gen.text == job.text == torch_job.text
        assert job.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert gen.finish_reason == job.finish_reason == torch_job.finish_reason == "stop"
    finally:
        scheduler.close()
        engine.close()
