"""Export: merges equal base + adapter, HF and GGUF exports reload to the tuned model's logits."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from instill.errors import InstillError
from instill.export import export_run
from instill.export.tuned import load_tuned
from tests.conftest import build_tiny


def _fake_run(tmp_path, tokenizer, quantize="none"):
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    base = build_tiny(tokenizer)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: perturb it so the merge changes weights
            p.data.normal_(0, 0.05)
    run = tmp_path / "run"
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    cfg = json.loads((run / "final" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (run / "final" / "adapter_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": {"quantize": quantize}, "data": {"sources": [{"path": str(data)}]}}
        )
    )
    (run / "data_stats.json").write_text(json.dumps({"rows": 3}))
    return run


@pytest.fixture
def run(tmp_path, tokenizer):
    return _fake_run(tmp_path, tokenizer)


def test_merged_equals_base_plus_adapter(run, tokenizer):
    tuned = load_tuned(run)
    x = torch.tensor([tokenizer.encode("hello there, how are you")])
    with torch.no_grad():
        ref = tuned.reference(input_ids=x).logits
        merged = tuned.merged(input_ids=x).logits
        base = tuned.reference.get_base_model()
        with tuned.reference.disable_adapter():
            plain = tuned.reference(input_ids=x).logits
    assert (ref - merged).abs().max().item() < 1e-5
    assert (ref - plain).abs().max().item() > 1e-3  # negative control: the adapter matters
    assert base is not tuned.merged


def test_hf_export_reloads_to_same_logits(run, tokenizer):
    result = export_run(run, fmt="hf", parts="both")
    assert result.figures.max_logit_diff < 1e-4
    assert result.figures.greedy_agreement == 1.0
    assert result.figures.prompt_tokens_identical and result.figures.end_of_turn_survived
    gen = json.loads((result.path / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    assert (result.path / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((result.path / "instill.json").read_text())
    assert manifest["data"] == {"rows": 3}
    [source] = manifest["data_sources"]
    digest = hashlib.sha256(b'{"prompt": "a", "response": "b"}\n').hexdigest()
    assert list(source["files"].values()) == [digest]
    assert manifest["verification"]["positions"] == result.figures.positions


@pytest.mark.parametrize("quant,tol", [("f32", 1e-4), ("q8_0", 1.0)])
def test_gguf_reloads_via_transformers(run, quant, tol):
    result = export_run(run, fmt="gguf", quant=quant)
    assert result.figures.max_logit_diff < tol
    assert result.figures.prompt_tokens_identical
    assert result.figures.end_of_turn_survived
    assert list(result.path.glob("*.gguf"))


def test_bad_inputs(tmp_path, run, tokenizer):
    with pytest.raises(InstillError, match="no final/"):
        export_run(tmp_path)
    with pytest.raises(InstillError, match="q4_1"):
        export_run(run, fmt="gguf", quant="q3_k")
    (run / "export" / "hf-fp32").mkdir(parents=True)
    with pytest.raises(InstillError, match="--overwrite"):
        export_run(run, fmt="hf")
    q = _fake_run(tmp_path / "q", tokenizer, quantize="4bit")
    with pytest.raises(InstillError, match="--dequantize"):
        export_run(q, fmt="hf")


def test_unsupported_arch_names_supported(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    run = tmp_path / "gpt2run"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    with pytest.raises(InstillError, match="'gpt2' is not supported.*llama"):
        export_run(run, fmt="gguf", quant="f32")
    assert not (run / "export").exists()


def test_changed_template_fails_and_leaves_nothing(run, monkeypatch):
    from instill.export import gguf_export
    from instill.export import run as export_module

    real = export_module.load_tuned

    def tampered(*args, **kwargs):
        tuned = real(*args, **kwargs)
        # the export writes this template; the reference tokenizer keeps the trained one
        saved = tuned.tokenizer.chat_template
        copy_tok = type(tuned.tokenizer).from_pretrained(str(run / "final"))
        copy_tok.chat_template = saved.replace("<|im_start|>assistant", "<|im_start|>bot")
        tuned_ref_tok = tuned.tokenizer
        tuned.tokenizer = copy_tok
        monkeypatch.setattr(gguf_export, "compare", _compare_against(tuned_ref_tok))
        return tuned

    monkeypatch.setattr(export_module, "load_tuned", tampered)
    with pytest.raises(InstillError, match="chat template renders different"):
        export_run(run, fmt="gguf", quant="f32")
    assert not (run / "export" / "gguf-f32").exists()


def _compare_against(ref_tok):
    from instill.export.verify import compare

    def _compare(reference, _tok, reloaded, kind):
        return compare(reference, ref_tok, reloaded, kind)

    return _compare


def test_cli_error_is_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "instill", "export", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "no final/" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_four_bit_drift_fails_with_advice_unless_accepted(run):
    from instill.export.verify import Figures, check

    drifted = Figures(29.5, 0.579, 19, True, True, None, 0.8)  # the quickstart's q4_1 figures
    with pytest.raises(InstillError, match=r"0\.579 < 0\.8.*--quant q8_0.*--min-agreement"):
        check(drifted, "gguf q4_1")
    check(Figures(29.5, 0.579, 19, True, True, None, 0.5), "gguf q4_1")  # a floor the user set
    with pytest.raises(InstillError, match="between 0 and 1"):
        export_run(run, fmt="gguf", quant="q4_1", min_agreement=2.0)
    result = export_run(run, fmt="gguf", quant="q4_1", min_agreement=0.0)
    manifest = json.loads((result.path / "instill.json").read_text())
    assert manifest["verification"]["agreement_tolerance"] == 0.0


def test_auto_refuses_a_max_size_below_its_smallest_file_before_writing(tmp_path, tokenizer):
    """--quant auto kept every tensor at its cheapest type and wrote over the budget; now a
    budget below the smallest file is refused before anything is written, naming that size,
    and that size is one it can meet."""
    import re

    run = _fake_run(tmp_path, tokenizer)
    with pytest.raises(InstillError) as err:
        export_run(run, fmt="gguf", quant="auto", max_size_mb=1.0)
    message = str(err.value)
    found = re.fullmatch(
        r"--max-size 1: the smallest file --quant auto can write for this model is "
        r"(\d+\.\d) MB \(every tensor at its cheapest type, norms f32, with the vocabulary and "
        r"headers\); give --max-size \1 or more",
        message,
    )
    assert found, message
    assert not (run / "export").exists()  # nothing written, not even a temporary folder
    smallest = float(found.group(1))
    with pytest.raises(InstillError, match="smallest file"):
        export_run(run, fmt="gguf", quant="auto", max_size_mb=smallest - 0.1)
    result = export_run(run, fmt="gguf", quant="auto", max_size_mb=smallest, min_agreement=0.0)
    [path] = result.path.glob("*.gguf")
    assert path.stat().st_size <= smallest * 1e6


def test_a_gguf_converts_to_the_same_files_reading_it_once(run, tmp_path, monkeypatch):
    """resolve.one_gguf_read: transformers reads a GGUF once for the tokenizer, the config and
    the weights each; instill's conversion reads it once and writes the same files."""
    import contextlib

    import gguf as gguf_py

    from instill.models import resolve

    [path] = export_run(run, fmt="gguf", quant="q8_0").path.glob("*.gguf")
    reads: list[str] = []
    real = gguf_py.GGUFReader

    def counted(file, *args, **kwargs):
        reads.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(gguf_py, "GGUFReader", counted)
    resolve.convert_gguf(path, tmp_path / "once", "digest")
    assert len(reads) == 1
    with monkeypatch.context() as m:  # transformers' own way, for the reference
        m.setattr(resolve, "one_gguf_read", contextlib.nullcontext)
        resolve.convert_gguf(path, tmp_path / "plain", "digest")
    assert len(reads) == 4  # three more: tokenizer, config, weights
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "once").iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    for name in files:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
