"""Int8 weight-only decoding (infer/int8.py): the layer's arithmetic, the tiny model's greedy
replies against float32, the --int8 option reaching the engine, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from instill.errors import InstillError
from instill.infer import GenParams, generate
from instill.infer.int8 import Int8Linear, for_int8_decoding, quantize_int8

PROMPTS = [
    "Add 12 and 30.",
    "Write the word cat in capitals.",
    "Name a colour.",
    "What is the capital of France?",
    "Count to five.",
    "Say hello.",
    "Reverse the word stone.",
    "Give me a fruit.",
]


@pytest.fixture
def kernel_here(monkeypatch):
    """The kernel check passes whatever this CPU is (it refuses AVX2, where tests run)."""
    monkeypatch.setattr("instill.infer.int8.int8_unavailable", lambda: None)


def test_int8_linear_is_the_dequantised_matmul_and_within_rounding_of_float32():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = Int8Linear(lin.weight, lin.bias)
    assert q.weight_int8.dtype == torch.int8 and q.scales.shape == (40,)
    assert q.weight_int8.abs().max() == 127  # each row's largest weight maps to 127
    x = torch.randn(3, 5, 96)  # any leading shape: the kernel itself takes 2-D only
    y = q(x)
    assert y.shape == (3, 5, 40)
    dequant = x @ q.dequantized().T + lin.bias
    torch.testing.assert_close(y, dequant, atol=1e-5, rtol=1e-5)
    # against the float weights: each weight is off by at most half a step of its row's scale
    bound = x.abs().sum(-1, keepdim=True) * (q.scales / 2) + 1e-5
    assert ((y - lin(x)).abs() <= bound).all()
    assert (y - lin(x)).abs().max() > 0  # it does quantise


def test_quantize_without_head_keeps_the_embedding_and_tied_head(tiny):
    emb = tiny.get_input_embeddings().weight.clone()
    n = quantize_int8(tiny, lm_head=False)
    assert n == 2 * 7  # q k v o gate up down, 2 layers; the output projection stays float
    assert (
        isinstance(tiny.lm_head, nn.Linear)
        and tiny.lm_head.weight is tiny.model.embed_tokens.weight
    )
    assert torch.equal(tiny.get_input_embeddings().weight, emb)
    assert not any(type(m) is nn.Linear and m is not tiny.lm_head for m in tiny.modules())


def test_quantised_head_is_an_untied_int8_copy(tiny):
    emb = tiny.get_input_embeddings().weight.clone()
    assert quantize_int8(tiny) == 15
    assert isinstance(tiny.lm_head, Int8Linear)
    assert torch.equal(tiny.get_input_embeddings().weight, emb)  # the embedding keeps float32


def test_tiny_model_int8_logits_close_and_greedy_replies_agree(chatty, tokenizer):
    """The untied tiny model (varied replies): logits within 2% of their spread; greedy replies
    to 8 fixed prompts, 16 tokens each: at least 3 identical and 72 of the 128 tokens before
    the first difference (measured: 4 identical, 90 tokens; random weights leave near-ties
    that a rounding flips, as on the real model: README, Generation)."""
    import copy

    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = GenParams(max_new_tokens=16)
    ref = generate(chatty, tokenizer, convs, params)
    ids = tokenizer("Add 12 and 30.", return_tensors="pt").input_ids
    with torch.inference_mode():
        want = chatty(ids).logits
    q = copy.deepcopy(chatty)
    quantize_int8(q)
    got = generate(q, tokenizer, convs, params)
    with torch.inference_mode():
        logits = q(ids).logits
    assert 0 < (logits - want).abs().max() <= 0.02 * (want.max() - want.min())
    pairs = [(a.token_ids, b.token_ids) for a, b in zip(ref, got, strict=True)]
    assert sum(a == b for a, b in pairs) >= 3
    before = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        for a, b in pairs
    ]
    assert sum(before) >= 72, before


def test_refuses_a_model_not_on_cpu(tiny, kernel_here):
    with pytest.raises(
        InstillError,
        match=r"--int8: int8 weight-only decoding runs on CPU, and "
        r"the model is on meta",
    ):
        for_int8_decoding(tiny.to("meta"))


def test_refuses_an_unmerged_adapter_model(tiny, kernel_here):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InstillError, match="4-bit base .*int8 cannot requantise"):
        for_int8_decoding(peft)


def test_refuses_a_cpu_without_the_kernel(tiny, monkeypatch):
    monkeypatch.setattr("instill.infer.int8.int8_unavailable", lambda: "no kernel here")
    with pytest.raises(InstillError, match="^--int8: no kernel here$"):
        for_int8_decoding(tiny)
    assert not any(isinstance(m, Int8Linear) for m in tiny.modules())  # left as it was


def test_the_kernel_is_refused_by_its_measured_speed_not_the_cpus_name(monkeypatch):
    """AVX-512 was taken to mean a fast kernel; measured on one, int8 decoded at 0.44x float32."""
    from instill.infer import int8

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(int8, "int8_speedup", lambda: 1 / 2.6)
    why = int8.int8_unavailable()
    assert "slower than float32 on this CPU (AVX512)" in why and "2.6x float32's time" in why
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(int8, "int8_speedup", lambda: 1.8)
    assert int8.int8_unavailable() is None


def test_int8_speedup_times_the_real_kernel():
    from instill.infer import int8

    speedup = int8.int8_speedup(reps=3)
    assert 0 < speedup < 100  # a ratio of two real timings, whichever way this CPU goes
    # the check before the load and the one at the swap read one measurement, not two
    int8.int8_speedup.cache_clear()
    first = int8.int8_unavailable()
    assert int8.int8_unavailable() == first
    assert int8.int8_speedup.cache_info().misses == 1


def _models_seen(monkeypatch) -> list:
    """The models every Engine (generate, chat, the server's scheduler) is built on."""
    from instill.infer.engine import Engine

    seen, init = [], Engine.__init__

    def spy(self, model, *a, **k):
        seen.append(model)
        init(self, model, *a, **k)

    monkeypatch.setattr(Engine, "__init__", spy)
    return seen


def _int8(model) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


@pytest.mark.parametrize("flag", [[], ["--int8"]])
def test_generate_and_chat_int8_reach_the_engine(
    tiny_dir, tmp_path, monkeypatch, kernel_here, flag
):
    from instill.cli import app

    seen = _models_seen(monkeypatch)
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"prompt": "Say hello."}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(tiny_dir), "--input", str(rows), "--output", str(out)]
    r = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", *flag])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        app, ["chat", str(tiny_dir), "--max-new-tokens", "4", *flag], input="hello\n"
    )
    assert r.exit_code == 0, r.output
    assert len(seen) == 2 and [_int8(m) for m in seen] == [bool(flag)] * 2


def test_serve_int8_reaches_the_scheduler(tiny_dir, monkeypatch, kernel_here):
    from instill.cli import app
    from instill.serve import ServeConfig, load_server

    server = load_server(str(tiny_dir), ServeConfig(int8=True))
    try:
        assert _int8(server._scheduler().model)
    finally:
        server._scheduler().close()
    got = {}
    monkeypatch.setattr("instill.serve.run_server", lambda model, cfg, **k: got.update(cfg=cfg))
    r = CliRunner().invoke(app, ["serve", str(tiny_dir), "--int8"])
    assert r.exit_code == 0, r.output
    assert got["cfg"].int8 is True


@pytest.mark.parametrize("command", ["chat", "generate", "serve"])
def test_cli_refuses_int8_before_loading(tmp_path, monkeypatch, command):
    """On a CPU without the kernel, --int8 is an InstillError (the CLI's one line) naming the
    option, said before the model (a folder that does not exist) is loaded."""
    from instill.cli import app

    monkeypatch.setattr("instill.infer.int8.int8_unavailable", lambda: "no kernel here")
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("served"))
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"prompt": "hi"}) + "\n")
    extra = {"generate": ["--input", str(rows), "--output", str(tmp_path / "o.jsonl")]}
    args = [command, str(tmp_path / "missing"), *extra.get(command, []), "--int8"]
    r = CliRunner().invoke(app, args, input="")
    assert isinstance(r.exception, InstillError), r.output
    assert str(r.exception) == "--int8: no kernel here"


def test_serve_int8_with_llamacpp_is_refused(tmp_path):
    from instill.cli import app

    r = CliRunner().invoke(
        app, ["serve", str(tmp_path / "m.gguf"), "--engine", "llama.cpp", "--int8"]
    )
    assert isinstance(r.exception, InstillError)
    assert str(r.exception).startswith("--int8: applies to --engine torch")
