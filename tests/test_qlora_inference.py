"""A QLoRA run (model.quantize: 4bit) is served only as it was trained: on its NF4 base. Without
a CUDA GPU and bitsandbytes, chat/generate/eval/serve refuse it with the reason instead of
applying the adapter to a full-precision base (a different model)."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from instill.config import AdapterConfig
from instill.errors import InstillError
from instill.models import attach_adapter, load_for_inference
from instill.models import load as load_module


def _run(tmp_path, tiny_dir, tokenizer, quantize: str):
    from conftest import build_tiny

    run = tmp_path / f"run-{quantize}"
    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4), seed=0)
    model.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    for p in model.parameters():  # a non-trivial adapter: B is zero at init
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"quantize": quantize}}))
    return run, model


def test_a_qlora_run_is_refused_without_its_nf4_base(tmp_path, tiny_dir, tokenizer, monkeypatch):
    run, _ = _run(tmp_path, tiny_dir, tokenizer, "4bit")
    assert load_module.trained_quantize(run / "final") == "4bit"
    monkeypatch.setattr(load_module, "load_model", lambda *a, **k: pytest.fail("base loaded"))
    for name in (run, run / "final"):
        with pytest.raises(InstillError, match=r"trained on a 4-bit NF4 base.*needs a CUDA GPU "
                           r"and bitsandbytes.*--dequantize"):  # fmt: skip
            load_for_inference(str(name))


def test_the_cli_says_so_in_one_line(tmp_path, tiny_dir, tokenizer, monkeypatch, capsys):
    from instill.cli import main

    run, _ = _run(tmp_path, tiny_dir, tokenizer, "4bit")
    monkeypatch.setattr(sys, "argv", ["instill", "chat", str(run)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "4-bit NF4 base" in err


def test_a_plain_lora_run_still_loads_merged(tmp_path, tiny_dir, tokenizer):
    run, model = _run(tmp_path, tiny_dir, tokenizer, "none")
    loaded = load_for_inference(str(run))
    assert not hasattr(loaded.model, "peft_config")  # merged
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
