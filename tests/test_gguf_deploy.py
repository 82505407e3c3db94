"""GGUF deployment, checked by llama.cpp itself: the LoRA adapter GGUF, the merged file with
per-tensor types (--quant auto), the verifier, the Modelfile, and `instill eval` on a GGUF.

The tiny tuned models here are tuned from a GGUF base, as the quickstart's is: a 2-layer Llama
with the real SmolLM2 vocabulary written as GGUF, converted the way `instill train` converts its
base, and an adapter with perturbed B matrices on top.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import openai
import pytest
import torch
import yaml

from instill.errors import InstillError
from instill.export import export_run
from instill.export.gguf_file import write_gguf
from instill.infer import llamacpp
from tests.conftest import adapter_run, build_tiny

needs_llamacpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason=f"llama.cpp is not installed; CI installs it ({llamacpp.INSTALL})",
)
CHATML = (
    '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}'
    '<|im_end|>\n{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)


def _tiny_base(
    tmp_path, tokenizer, default_source, quant: str, embed_std: float, linear_std: float | None
):
    """A tiny base as a GGUF file (the real model's pre-tokenizer), resolved as a run would."""
    from instill.models.resolve import resolve_model

    path = tmp_path / f"tiny-base.{quant}.gguf"
    base = build_tiny(tokenizer)
    g = torch.Generator().manual_seed(3)
    for name, p in base.named_parameters():  # sharper than random init: clear argmaxes
        if name.endswith("embed_tokens.weight"):
            p.data.normal_(0, embed_std, generator=g)
        elif linear_std is not None and name.endswith("proj.weight"):
            p.data.normal_(0, linear_std, generator=g)
    write_gguf(base, tokenizer, path, quant, name="tiny", base_gguf=default_source.gguf_path)
    return resolve_model(str(path))


def _tuned_run(
    tmp_path,
    tokenizer,
    default_source,
    *,
    base_quant="f32",
    std=0.05,
    embed_std=1.0,
    linear_std=None,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    **lora,
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    source = _tiny_base(tmp_path, tokenizer, default_source, base_quant, embed_std, linear_std)
    base = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    torch.manual_seed(0)  # A's initialisation
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), **lora)
    )
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: perturb it so the adapter changes the model
            p.data.normal_(0, std, generator=g)
    return adapter_run(tmp_path / "run", model, tokenizer, source), source


@pytest.fixture
def tuned(tmp_path, tokenizer, default_source):
    return _tuned_run(tmp_path, tokenizer, default_source)


def _gguf_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            fields[key] = bytes(f.parts[f.data[0]]).decode()
        elif f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            fields[key] = f.parts[f.data[0]][0].item()
    return fields, {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}


def test_adapter_gguf_metadata_names_and_shapes(tuned, tokenizer):
    run, source = tuned
    result = export_run(run, fmt="gguf-lora", quant="f32")
    [path] = result.path.glob("*.gguf")
    fields, tensors = _gguf_fields(path)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    assert fields["instill.base.sha256"] == source.sha256
    # 2 layers x 7 modules, an A and a B each; ggml shapes are (columns, rows)
    assert len(tensors) == 28
    assert tensors["blk.0.attn_q.weight.lora_a"][0] == (64, 8)  # A: r x in
    assert tensors["blk.0.attn_q.weight.lora_b"][0] == (8, 64)  # B: out x r
    assert tensors["blk.1.attn_k.weight.lora_b"][0] == (8, 32)  # 2 kv heads of 16
    assert tensors["blk.1.ffn_down.weight.lora_a"][0] == (128, 8)
    assert tensors["blk.1.ffn_down.weight.lora_b"][0] == (8, 64)
    assert {t for _, t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    manifest = json.loads((result.path / "instill.json").read_text())
    assert manifest["export"]["base_gguf"]["sha256"] == source.sha256
    assert manifest["export"]["base_gguf"]["path"] == source.gguf_path


def test_adapter_q_k_rows_match_the_merged_writer(tuned):
    """B's rows of Q and K take the rotary order the merged writer gives Q and K: the adapter
    file's update, added to the base GGUF's tensor, equals the merged GGUF's tensor."""
    from instill.export.gguf_lora import read_lora_gguf

    run, source = tuned
    lora = export_run(run, fmt="gguf-lora", quant="f32", output=run.parent / "lora")
    merged = export_run(
        run, fmt="gguf", quant="f32", output=run.parent / "merged", min_agreement=0.0
    )
    _, updates = read_lora_gguf(next(lora.path.glob("*.gguf")))
    base = {t.name: t for t in gguf.GGUFReader(source.gguf_path).tensors}
    out = {t.name: t for t in gguf.GGUFReader(str(next(merged.path.glob("*.gguf")))).tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight"):
        expected = torch.from_numpy(out[name].data.copy())
        got = torch.from_numpy(base[name].data.copy() + updates[name])
        assert (got - expected).abs().max().item() < 1e-5, name
        assert (torch.from_numpy(updates[name]).abs().max().item()) > 1e-3  # it is a change


@needs_llamacpp
@pytest.mark.parametrize("fmt", ["gguf-lora", "gguf"])
def test_f32_exports_agree_with_the_tuned_model_in_llamacpp(tuned, fmt):
    run, _ = tuned
    result = export_run(run, fmt=fmt, quant="f32")
    f = result.figures
    assert f.verifier.startswith("llama.cpp")
    assert f.max_logit_diff < 1e-3
    assert f.greedy_agreement == 1.0
    assert f.prompt_tokens_identical and f.end_of_turn_survived
    manifest = json.loads((result.path / "instill.json").read_text())
    assert manifest["verification"]["verifier"] == f.verifier


@needs_llamacpp
def test_llamacpp_sees_the_adapter(tuned, tokenizer):
    """Negative control for the adapter check: the base file alone, in llama.cpp, is far from
    the tuned model, so the agreement above is the adapter's doing."""
    from instill.export.tuned import load_tuned
    from instill.export.verify import compare, from_llamacpp

    run, source = tuned
    tuned_model = load_tuned(run)
    engine = llamacpp.open_gguf(source.gguf_path)
    try:
        f = compare(
            tuned_model.reference,
            tokenizer,
            from_llamacpp(engine, tokenizer, tokenizer.chat_template),
            "f32",
        )
    finally:
        engine.close()
    assert f.max_logit_diff > 0.1


@needs_llamacpp
@pytest.mark.parametrize(
    "fmt,quant", [("gguf-lora", "f16"), ("gguf-lora", "q8_0"), ("gguf", "q8_0")]
)
def test_llamacpp_loads_each_kind(tuned, fmt, quant):
    """(f32 of both kinds above; --quant auto in test_auto_spends_within_the_budget.)"""
    run, _ = tuned
    result = export_run(run, fmt=fmt, quant=quant)
    assert result.figures.verifier.startswith("llama.cpp")
    assert result.figures.greedy_agreement >= result.figures.agreement_tolerance
    [path] = result.path.glob("*.gguf")
    _, tensors = _gguf_fields(path)
    if fmt == "gguf-lora" and quant == "q8_0":  # A rows (64, 128 wide) quantise; B's r=8 cannot
        assert tensors["blk.0.attn_q.weight.lora_a"][1] == gguf.GGMLQuantizationType.Q8_0
        assert tensors["blk.0.attn_q.weight.lora_b"][1] == gguf.GGMLQuantizationType.F16


@needs_llamacpp
def test_requantised_4bit_merge_is_caught(tmp_path, tokenizer, default_source):
    """The negative control: a base on the 4-bit grid, tuned by a small update. Re-rounding the
    merge to q4_1 loses the update and the verifier refuses it; the adapter on the same q4_1
    base keeps it."""
    # base weights of std 0.2 sit on a q4_1 grid of step ~0.05; the update is ~0.02 an element
    run, _ = _tuned_run(
        tmp_path,
        tokenizer,
        default_source,
        base_quant="q4_1",
        std=0.05,
        embed_std=0.2,
        linear_std=0.2,
    )
    with pytest.raises(InstillError, match=r"greedy agreement 0\.[0-7]\d* < 0\.8.*--quant q8_0"):
        export_run(run, fmt="gguf", quant="q4_1")
    assert not (run / "export" / "gguf-q4_1").exists()
    adapter = export_run(run, fmt="gguf-lora", quant="f16")
    assert adapter.figures.verifier.startswith("llama.cpp")
    assert adapter.figures.greedy_agreement >= 0.9


def test_modelfile_names_files_and_template(tuned):
    run, source = tuned
    result = export_run(run, fmt="gguf-lora", quant="f16")
    lines = (result.path / "Modelfile").read_text()
    [adapter] = result.path.glob("*.lora-f16.gguf")
    assert f"\nFROM {source.gguf_path}\n" in lines
    assert f"\nADAPTER ./{adapter.name}\n" in lines
    # Ollama accepts ADAPTER (its source, README); the way out if one does not is said
    assert "\n# an Ollama that refuses ADAPTER: export --format gguf" in lines
    assert f'\nTEMPLATE """{CHATML}"""\n' in lines
    assert (
        '\nSYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""'
        in lines
    )
    assert '\nPARAMETER stop "<|im_end|>"\n' in lines
    script = (result.path / "llama-server.sh").read_text()
    assert f"-m {source.gguf_path} " in script
    assert f'--lora "$(dirname "$0")"/{adapter.name} ' in script
    assert "--chat-template-file" in script
    template = (result.path / "chat_template.jinja").read_text()
    assert template == json.loads((run / "final" / "tokenizer_config.json").read_text()).get(
        "chat_template", template
    )


def test_go_template_pieces_reproduce_the_jinja_template(tokenizer):
    from instill.export.deploy import Pieces, chat_pieces

    pieces = chat_pieces(tokenizer)
    assert isinstance(pieces, Pieces)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert pieces.render(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    odd = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # turns numbered by position: no fixed prefix per role reproduces it
    odd.chat_template = "{% for m in messages %}{{ loop.index }}: {{ m.content }}\n{% endfor %}"
    assert chat_pieces(odd) is None


@pytest.mark.parametrize(
    "lora,match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"alpha_pattern": {"q_proj": 4}}, "different alphas"),
        ({"use_rslora": True, "rank_pattern": {"q_proj": 4}}, "different alphas"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_refusals(tmp_path, tokenizer, default_source, lora, match):
    run, _ = _tuned_run(tmp_path, tokenizer, default_source, **lora)
    with pytest.raises(InstillError, match=match):
        export_run(run, fmt="gguf-lora")
    assert not (run / "export").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft's own warning about tied targets
@pytest.mark.parametrize("module", ["embed_tokens", "lm_head"])
def test_refuses_adapter_on_tied_embeddings_or_head(tmp_path, tokenizer, default_source, module):
    run, _ = _tuned_run(tmp_path, tokenizer, default_source, targets=("q_proj", module))
    with pytest.raises(InstillError, match=f"{module} .*output head, tied"):
        export_run(run, fmt="gguf-lora")


def test_rslora_alpha_is_rescaled(tmp_path, tokenizer, default_source):
    run, _ = _tuned_run(tmp_path, tokenizer, default_source, use_rslora=True)
    result = export_run(run, fmt="gguf-lora", quant="f32")
    fields, _ = _gguf_fields(next(result.path.glob("*.gguf")))
    assert fields["adapter.lora.alpha"] == pytest.approx(16 * math.sqrt(8), rel=1e-6)
    assert result.figures.greedy_agreement == 1.0


def test_base_must_be_the_runs_gguf(tmp_path, tuned, tokenizer):
    run, source = tuned
    record = json.loads((run / "run.json").read_text())
    record["model"]["sha256"] = "0" * 64
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(InstillError, match=f"{source.gguf_path}.*sha256 0000"):
        export_run(run, fmt="gguf-lora")


def test_adapter_needs_a_gguf_base(tmp_path, tokenizer):
    from tests.test_export import _fake_run

    run = _fake_run(tmp_path, tokenizer)  # its base is a Hugging Face directory
    with pytest.raises(InstillError, match="applies an adapter to a base GGUF.*--format gguf"):
        export_run(run, fmt="gguf-lora")
    with pytest.raises(InstillError, match="f32, f16, q8_0"):
        export_run(run, fmt="gguf-lora", quant="q4_1")
    with pytest.raises(InstillError, match="--quant auto only"):
        export_run(run, fmt="gguf", quant="q8_0", max_size_mb=50)


@needs_llamacpp
def test_eval_runs_the_deployed_files_through_llamacpp(
    tmp_path, tokenizer, default_source, monkeypatch
):
    """`instill eval EXPORT --engine llama.cpp` answers as the tuned model does in memory (f32
    adapter: the same greedy text), and an export folder equals base + --lora given by hand."""
    from instill.eval.tasks import builtin_task
    from instill.export.tuned import load_tuned
    from instill.infer import GenParams, generate
    from tests.test_cli import succeed

    # weights of a larger spread than random init: replies that differ from prompt to prompt
    run, source = _tuned_run(tmp_path, tokenizer, default_source, embed_std=0.2, linear_std=0.2)
    export = export_run(run, fmt="gguf-lora", quant="f32")
    [adapter] = export.path.glob("*.gguf")
    common = ["--engine", "llama.cpp", "--per-family", "1", "--max-new-tokens", "12"]
    succeed(["eval", str(export.path), *common, "--output", str(tmp_path / "a")], monkeypatch)
    succeed(
        [
            "eval",
            source.gguf_path,
            "--lora",
            str(adapter),
            *common,
            "--output",
            str(tmp_path / "b"),
        ],
        monkeypatch,
    )
    a = [json.loads(line) for line in (tmp_path / "a" / "builtin.jsonl").open()]
    b = [json.loads(line) for line in (tmp_path / "b" / "builtin.jsonl").open()]
    summary = json.loads((tmp_path / "a" / "builtin.json").read_text())
    assert summary["engine"].startswith("llama.cpp") and summary["decode_tokens_per_s"] > 0
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    examples = builtin_task(1, 0).examples
    assert [r["id"] for r in a] == [ex.id for ex in examples]
    model = load_tuned(run).reference
    gens = generate(
        model, tokenizer, [list(ex.prompt) for ex in examples], GenParams(max_new_tokens=12)
    )
    assert [r["prediction"] for r in a] == [g.text for g in gens]
    assert len({r["prediction"] for r in a}) > 1  # not one constant answer


def test_eval_engine_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    from tests.test_cli import assert_user_error, run

    code, _, err = run(["eval", "x.gguf", "--lora", "a.gguf"], capsys, monkeypatch)
    assert_user_error(code, err, "--lora", "--engine llama.cpp")
    code, _, err = run(["eval", str(tmp_path), "--engine", "llama.cpp"], capsys, monkeypatch)
    assert_user_error(code, err, "needs a .gguf file")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, _, err = run(
        ["eval", str(tmp_path / "m.gguf"), "--engine", "llama.cpp", "--suite", "general"],
        capsys,
        monkeypatch,
    )
    assert_user_error(code, err, "suite general", "--engine llama.cpp does not do")


def test_stochastic_regrid_keeps_an_update_nearest_rounding_drops():
    """An update of a tenth of a 4-bit step: rounding to the nearest point of the base's grid
    (or requantising afresh, whose grid is the same) gives the base back; stochastic rounding
    onto the grid keeps the update on average, and an untouched tensor keeps its exact bytes."""
    from instill.export.regrid import regrid

    q41 = gguf.GGMLQuantizationType.Q4_1
    rng = np.random.default_rng(0)
    raw = gguf.quants.quantize(rng.normal(0, 0.1, (64, 256)).astype(np.float32), q41)
    base = gguf.quants.dequantize(raw, q41)
    step = (base.reshape(-1, 32).max(1) - base.reshape(-1, 32).min(1)).mean() / 15
    delta = 0.1 * step * rng.choice([-1.0, 1.0], base.shape).astype(np.float32)
    tuned = base + delta
    assert np.array_equal(regrid(raw, q41, base, "t"), raw)

    def kept(approx):  # the share of the update the rounded tensor holds
        return float(((approx - base) * delta).sum() / (delta * delta).sum())

    assert kept(gguf.quants.dequantize(gguf.quants.quantize(tuned, q41), q41)) < 0.3
    # all of it but the blocks' end points pushed off the grid (2 of 32 weights, half the time)
    assert 0.85 < kept(gguf.quants.dequantize(regrid(raw, q41, tuned, "t"), q41)) < 1.05
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        raw = gguf.quants.quantize(base, qtype)
        grid = gguf.quants.dequantize(raw, qtype)
        moved = gguf.quants.dequantize(regrid(raw, qtype, grid + 0.01, "t"), qtype)
        assert abs((moved - grid).mean() - 0.01) < 0.002, qtype


def test_auto_spends_within_the_budget(tmp_path, tokenizer, default_source):
    run, _ = _tuned_run(tmp_path, tokenizer, default_source, base_quant="q4_1")
    small = export_run(
        run, fmt="gguf", quant="auto", max_size_mb=4.0, min_agreement=0.0, output=tmp_path / "small"
    )
    large = export_run(
        run, fmt="gguf", quant="auto", max_size_mb=6.0, min_agreement=0.0, output=tmp_path / "large"
    )
    costs = []
    for result, mb in ((small, 4.0), (large, 6.0)):
        if llamacpp.available():  # the mixed file loads in llama.cpp and meets its floor
            assert result.figures.verifier.startswith("llama.cpp")
            assert result.figures.greedy_agreement >= 0.9
        [path] = result.path.glob("*.gguf")
        assert path.stat().st_size <= mb * 1e6
        auto = json.loads((result.path / "instill.json").read_text())["export"]["auto"]
        costs.append(sum(t["cost"] for t in auto["tensors"].values()))
    assert costs[1] < costs[0]  # the larger budget bought lower expected drift
    fields, tensors = _gguf_fields(next(small.path.glob("*.gguf")))
    assert tensors["token_embd.weight"][1] != gguf.GGMLQuantizationType.Q8_0  # it had to give


def test_without_llamacpp_the_fallback_check_runs_and_says_so(tuned, monkeypatch, capsys):
    """No extra installed: merged files are read back by transformers' GGUF reader, adapters by
    the gguf reader added to the base; both still agree exactly at f32, and the export names the
    check that ran and how to get llama.cpp's."""
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    run, _ = tuned
    adapter = export_run(run, fmt="gguf-lora", quant="f32")
    merged = export_run(run, fmt="gguf", quant="f32")
    assert adapter.figures.verifier == "gguf reader + transformers (llama.cpp not installed)"
    assert merged.figures.verifier == "transformers GGUF reader"
    for f in (adapter.figures, merged.figures):
        assert f.max_logit_diff < 1e-4 and f.greedy_agreement == 1.0
    out = capsys.readouterr().out
    assert "llama.cpp is not installed" in out and "pip install" in out


@needs_llamacpp
def test_report_sets_the_deployed_score_beside_the_in_memory_one(
    tmp_path, tokenizer, default_source, monkeypatch
):
    """`instill eval EXPORT --engine llama.cpp` on an export of a run answers the run's own
    held-out split and records it in RUN/eval/deployed/; `instill report RUN` then shows it
    beside the tuned model's in-memory score on the same prompts, and lists the GGUF exports
    not scored yet. An f32 adapter answers exactly as the tuned model does; a changed in-memory
    answer shows up in both columns (the negative control)."""
    from instill.config import EvalConfig
    from instill.eval.results import RECORDS_SHA256, MismatchedResult, records_sha256
    from instill.eval.runner import evaluate, write_result
    from instill.eval.tasks import builtin_task
    from instill.export.tuned import load_tuned
    from tests.test_cli import succeed
    from tests.test_report import FIXTURE

    run, _ = _tuned_run(tmp_path, tokenizer, default_source, embed_std=0.2, linear_std=0.2)
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    recipe["data"] = {"builtin": {"eval_per_family": 1, "seed": 3}}
    recipe["eval"] = {"max_new_tokens": 12, "holdout_clusters": ["tables"]}
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    # the run's record as instill train writes it (the fixture's), with this run's tiny base
    record = json.loads((FIXTURE / "run.json").read_text())
    record["model"] |= json.loads((run / "run.json").read_text())["model"]
    (run / "run.json").write_text(json.dumps(record))
    task = builtin_task(1, 3, holdout=["tables"])
    tuned = load_tuned(run)
    memory = evaluate(tuned.reference, tokenizer, task, EvalConfig(max_new_tokens=12), "tuned")
    write_result(memory, run / "eval")

    adapter = export_run(run, fmt="gguf-lora", quant="f32")
    export_run(run, fmt="gguf", quant="q8_0", min_agreement=0.0)
    succeed(["eval", str(adapter.path), "--engine", "llama.cpp"], monkeypatch)
    folder = run / "eval" / "deployed" / adapter.path.name
    summary = json.loads((folder / "builtin.json").read_text())
    deployed = [json.loads(line) for line in (folder / "builtin.jsonl").open()]
    assert [r["id"] for r in deployed] == [ex.id for ex in task.examples]  # the run's split
    assert summary["holdout_clusters"] == ["tables"]
    assert summary["deployed"]["format"] == "gguf-lora"
    assert summary["deployed"]["verification"]["verifier"].startswith("llama.cpp")
    assert [r["prediction"] for r in deployed] == [r["prediction"] for r in memory.records]

    from instill.report.deployed import deployed_rows

    n = len(deployed)
    score = 100 * memory.mean
    rows, lines = deployed_rows(run)
    assert rows[0][0] == "adapter f32" and rows[0][4] == "builtin"
    assert rows[0][5:] == [f"{score:.1f}", f"{score:.1f}", "100.0", str(n)]
    assert rows[1][0] == "merged q8_0" and rows[1][4] == "not scored"
    assert lines[0] == (
        f"exported adapter f32: {score:.1f}% vs {score:.1f}% in memory (builtin, {n} prompts; "
        "100.0% of answers identical)"
    )
    changed = [dict(r) for r in memory.records]
    changed[0] |= {"prediction": changed[0]["prediction"] + " (changed)", "score": 1.0}
    (run / "eval" / "builtin.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    with pytest.raises(MismatchedResult):  # records changed behind their summary's back
        deployed_rows(run)
    summary = json.loads((run / "eval" / "builtin.json").read_text())
    summary[RECORDS_SHA256] = records_sha256(run / "eval" / "builtin.jsonl")  # as written whole
    (run / "eval" / "builtin.json").write_text(json.dumps(summary))
    rows, _ = deployed_rows(run)
    moved = 100 * (sum(r["score"] for r in changed) / n)
    assert rows[0][5:] == [f"{score:.1f}", f"{moved:.1f}", f"{100 * (n - 1) / n:.1f}", str(n)]

    succeed(["report", str(run)], monkeypatch)
    report = (run / "report.md").read_text()
    assert "## Deployed: the exported GGUF files as llama.cpp answers them" in report
    assert f"exported adapter f32: {score:.1f}% vs {moved:.1f}% in memory" in report
    assert f"exported merged q8_0: not scored; instill eval {run}/export/gguf-q8_0" in report
    export_run(run, fmt="gguf-lora", quant="f32", overwrite=True, min_agreement=0.5)
    assert deployed_rows(run)[0][0][0] == "adapter f32 (an earlier export; score it again)"


def test_copy_base_makes_a_movable_folder(tuned, tmp_path, monkeypatch):
    """--copy-base puts the run's exact base GGUF beside the adapter, and the Modelfile,
    llama-server.sh and instill eval's target name it there, so the folder still runs after it
    is moved and the original base is gone. A copy whose sha256 differs is refused."""
    import os
    import shutil

    from instill.infer.llamacpp import target
    from instill.models.resolve import sha256_file

    run, source = tuned
    result = export_run(run, fmt="gguf-lora", quant="f16", copy_base=True)
    base = Path(source.gguf_path)
    inside = result.path / base.name
    assert sha256_file(inside) == source.sha256
    assert os.stat(inside).st_ino == os.stat(base).st_ino  # hardlinked: same filesystem here
    lines = (result.path / "Modelfile").read_text()
    assert f"\nFROM ./{base.name}\n" in lines
    assert not [x for x in lines.splitlines() if str(base.parent) in x and x[0] != "#"]
    script = (result.path / "llama-server.sh").read_text()
    assert f'-m "$(dirname "$0")"/{base.name} ' in script
    manifest = json.loads((result.path / "instill.json").read_text())
    assert manifest["export"]["base_gguf"]["file"] == base.name
    moved = Path(shutil.move(result.path, tmp_path / "elsewhere"))
    base.rename(base.with_suffix(".gone"))
    t = target(str(moved), None)
    assert t.model == moved / base.name and t.lora.parent == moved
    if llamacpp.available():  # llama.cpp loads the moved folder's own files
        engine = llamacpp.open_gguf(t.model, lora=t.lora)
        assert engine.tokenize("hi")
        engine.close()
    base.with_suffix(".gone").rename(base)

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    def bad_copy(src, dst):
        Path(dst).write_bytes(b"GGUF not the base")

    monkeypatch.setattr(os, "link", cross_device)
    monkeypatch.setattr(shutil, "copyfile", bad_copy)
    with pytest.raises(InstillError, match=r"--copy-base: the base GGUF copied .*another sha256"):
        export_run(run, fmt="gguf-lora", quant="f16", copy_base=True, output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(InstillError, match="--copy-base: for --format gguf-lora only"):
        export_run(run, fmt="gguf", quant="f16", copy_base=True)


@needs_llamacpp
def test_serve_with_llamacpp_answers_as_the_tuned_model(tmp_path, tokenizer, default_source):
    """`instill serve EXPORT --engine llama.cpp`: the same OpenAI API (the real openai client,
    auth, limits) with llama.cpp decoding. An f32 adapter's greedy reply is the tuned model's
    own; streaming gives the same text; max_tokens, stop strings, seeded sampling, raw prompts
    and the context limit behave as on the torch server."""
    from instill.export.tuned import load_tuned
    from instill.infer import GenParams, generate
    from instill.serve import ServeConfig
    from instill.serve.llamacpp import CONTEXT, load_llamacpp_server
    from tests.test_serve import KEY, client, start_server

    run, _ = _tuned_run(tmp_path, tokenizer, default_source, embed_std=0.2, linear_std=0.2)
    export = export_run(run, fmt="gguf-lora", quant="f32")
    server = load_llamacpp_server(
        str(export.path), None, ServeConfig(api_key=KEY, max_tokens_cap=4096)
    )
    base, server, stop = start_server(server)
    try:
        name = export.path.name
        c = client(base)
        assert [m.id for m in c.models.list().data][0] == name
        msg = [{"role": "user", "content": "Name three primary colours."}]
        want = generate(load_tuned(run).reference, tokenizer, [msg], GenParams(max_new_tokens=12))
        reply = c.chat.completions.create(model=name, messages=msg, max_tokens=12)
        text = reply.choices[0].message.content
        assert text == want[0].text and len(text) > 6
        assert reply.choices[0].finish_reason == want[0].finish_reason
        assert reply.usage.completion_tokens == want[0].completion_tokens
        assert reply.usage.prompt_tokens == want[0].prompt_tokens

        chunks = list(
            c.chat.completions.create(
                model=name,
                messages=msg,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == (
            want[0].finish_reason
        )
        assert chunks[-1].usage.completion_tokens == want[0].completion_tokens

        short = c.chat.completions.create(model=name, messages=msg, max_tokens=3)
        assert short.choices[0].finish_reason == "length"
        assert short.usage.completion_tokens == 3
        assert text.startswith(short.choices[0].message.content)

        cut = text[len(text) // 2 : len(text) // 2 + 2]
        stopped = c.chat.completions.create(model=name, messages=msg, max_tokens=12, stop=[cut])
        assert stopped.choices[0].message.content == text[: text.find(cut)]
        assert stopped.choices[0].finish_reason == "stop"

        def sampled(seed):
            r = c.chat.completions.create(
                model=name, messages=msg, max_tokens=8, temperature=1.5, seed=seed
            )
            return r.choices[0].message.content

        assert sampled(7) == sampled(7)
        # every seed the request schema takes (OpenAI's int64) repeats its reply, including
        # llama.cpp's "random" seed 0xFFFFFFFF and seeds past its 32 bits
        for seed in (2**32 - 1, 2**63 - 1, -(2**63)):
            assert sampled(seed) == sampled(seed)
        assert len({sampled(s) for s in range(5)} | {text}) > 2  # it does sample

        raw = c.completions.create(model=name, prompt="The sea is", max_tokens=4)
        assert raw.usage.prompt_tokens == len(tokenizer("The sea is")["input_ids"])
        assert raw.usage.completion_tokens == 4

        # llama.cpp's context: the tiny model's trained length, under serve's own cap
        assert server.context == min(CONTEXT, load_tuned(run).merged.config.max_position_embeddings)
        with pytest.raises(openai.BadRequestError, match=f"context length of {server.context} "):
            c.chat.completions.create(model=name, messages=msg, max_tokens=server.context)
        with pytest.raises(openai.AuthenticationError):
            client(base, key="wrong").chat.completions.create(model=name, messages=msg)
    finally:
        stop()
        server.model.close()


def test_serve_engine_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    from tests.test_cli import assert_user_error, run

    code, _, err = run(["serve", "x.gguf", "--lora", "a.gguf"], capsys, monkeypatch)
    assert_user_error(code, err, "--lora", "--engine llama.cpp")
    code, _, err = run(["serve", str(tmp_path), "--engine", "llama.cpp"], capsys, monkeypatch)
    assert_user_error(code, err, "needs a .gguf file")
    code, _, err = run(["serve", "x", "--engine", "vllm"], capsys, monkeypatch)
    assert_user_error(code, err, "--engine vllm", "torch or llama.cpp")


@pytest.mark.parametrize("copied", [False, True])
def test_a_replaced_base_gguf_is_refused_with_both_hashes(tmp_path, capsys, monkeypatch, copied):
    """An adapter export names its base GGUF and the sha256 it was exported for; `eval` and
    `serve --engine llama.cpp` check the file before anything loads, and refuse another one
    (it would score or serve another model under the export's name)."""
    import hashlib

    from instill.infer.llamacpp import target
    from tests.test_cli import assert_user_error, run

    export = tmp_path / "export"
    export.mkdir()
    base = export / "base.gguf" if copied else tmp_path / "base.gguf"
    base.write_bytes(b"GGUF the base it was tuned on")
    (export / "run.lora-f32.gguf").write_bytes(b"GGUF adapter")
    recorded = hashlib.sha256(base.read_bytes()).hexdigest()
    manifest = {
        "export": {
            "format": "gguf-lora",
            "file": "run.lora-f32.gguf",
            "base_gguf": {"path": str(tmp_path / "base.gguf"), "sha256": recorded,
                          "file": "base.gguf" if copied else None},
        }
    }  # fmt: skip
    (export / "instill.json").write_text(json.dumps(manifest))
    from instill.models import resolve

    hashed = []
    real = resolve.sha256_file
    monkeypatch.setattr(resolve, "sha256_file", lambda p: hashed.append(p) or real(p))
    for _ in range(2):  # serve checks before loading, then loads: the file is hashed once
        assert target(str(export), None).model == base  # the recorded file: accepted
    assert hashed == [base]
    base.write_bytes(b"GGUF another model")
    now = hashlib.sha256(base.read_bytes()).hexdigest()
    said = (
        f"{base}: sha256 {now}, but {export} was exported for a base GGUF with sha256 "
        f"{recorded} (its instill.json); the adapter reproduces the tuned model on that base "
        f"only: put that exact file back at {base}, or export the run again"
    )
    with pytest.raises(InstillError) as info:
        target(str(export), None)
    assert str(info.value) == said
    for command in ("eval", "serve"):
        code, _, err = run([command, str(export), "--engine", "llama.cpp"], capsys, monkeypatch)
        assert_user_error(code, err, said)
    base.unlink()
    code, _, err = run(["eval", str(export), "--engine", "llama.cpp"], capsys, monkeypatch)
    assert_user_error(
        code, err, f"{base}: the base GGUF of the export {export} is missing; put the file "
        f"with sha256 {recorded} back there, or export the run again"
    )  # fmt: skip
