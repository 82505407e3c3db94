"""models.load.load_adapter_model: the one base + adapter loader (inference merges its result,
export keeps it as the reference and merges a copy)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from instill.config import AdapterConfig, ModelConfig
from instill.errors import InstillError
from instill.models import attach_adapter, load_adapter_model

IDS = torch.tensor([[1, 2, 3, 4, 5, 6]])


def _adapter(tmp_path, tiny_dir, tokenizer):
    from conftest import build_tiny

    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4), seed=0)
    model.peft_config["default"].base_model_name_or_path = str(tiny_dir)
    torch.manual_seed(1)
    for p in model.parameters():  # a non-trivial adapter: B is zero at init
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    folder = tmp_path / "final"
    model.save_pretrained(folder)
    saved = copy.deepcopy(tokenizer)
    saved.chat_template = tokenizer.chat_template + "{# the adapter's own #}"
    saved.save_pretrained(folder)
    return folder, model.eval()


def test_base_plus_unmerged_adapter_and_the_adapters_tokenizer(tmp_path, tiny_dir, tokenizer):
    from peft import PeftModel

    folder, trained = _adapter(tmp_path, tiny_dir, tokenizer)
    loaded = load_adapter_model(folder, ModelConfig(name=str(folder), device="cpu"))
    assert isinstance(loaded.model, PeftModel) and not loaded.model.training
    assert loaded.tokenizer.chat_template.endswith("{# the adapter's own #}")
    assert loaded.source.path == str(tiny_dir)
    with torch.no_grad():
        want = trained(IDS).logits
        got = loaded.model(IDS).logits
        with loaded.model.disable_adapter():
            base = loaded.model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # negative control: the adapter moves the logits, so the match above is the adapter's
    assert (base - want).abs().max() > 1e-3


def test_an_adapter_without_its_base_name_says_so(tmp_path, tiny_dir, tokenizer):
    folder, _ = _adapter(tmp_path, tiny_dir, tokenizer)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InstillError, match=r"adapter_config.json: no base_model_name_or_path"):
        load_adapter_model(folder, ModelConfig(name=str(folder), device="cpu"))


def _trained_lora(tokenizer):
    from conftest import build_tiny

    model, _ = attach_adapter(build_tiny(tokenizer), AdapterConfig(r=4), seed=0)
    torch.manual_seed(1)
    for p in model.parameters():  # a non-trivial adapter: B is zero at init
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def test_a_run_evaluates_a_merged_copy_and_keeps_its_adapter(tokenizer):
    from instill.models.adapters import merged_for_evaluation

    model = _trained_lora(tokenizer)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        merged = merged_for_evaluation(model)
        got = merged(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    assert not hasattr(merged, "peft_config") and merged is not model
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter's update is in the copy
    # the model itself is untouched: same adapter, same base weights, bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_full_fine_tuning_or_no_room_evaluates_the_model_itself(tokenizer, monkeypatch):
    from conftest import build_tiny

    import instill.models.load as load
    from instill.models.adapters import merged_for_evaluation

    full = build_tiny(tokenizer)
    assert merged_for_evaluation(full) is full
    model = _trained_lora(tokenizer)
    monkeypatch.setattr(load, "available_memory", lambda device: 1024)
    assert merged_for_evaluation(model) is model
