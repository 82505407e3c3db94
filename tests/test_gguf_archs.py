"""GGUF export beyond Llama, and the types llama.cpp's own quantizer writes (issue 28).

Each architecture: a tiny random model built from its transformers config (with the real
SmolLM2 vocabulary), written as a GGUF base the way a run's base would be, tuned by a LoRA with
perturbed B matrices; the merged export and the adapter export are then loaded by llama.cpp
and compared with the tuned model in memory (export_run's own verification, whose figures
these tests pin). The K-quant tests use a Llama whose rows are 256 wide (one K-quant block).
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from instill.errors import InstillError
from instill.export import export_run
from instill.export.gguf_file import SUPPORTED_ARCHS, write_gguf
from instill.infer import llamacpp
from tests.conftest import adapter_run

needs_llamacpp = pytest.mark.skipif(
    not llamacpp.available(),
    reason=f"llama.cpp is not installed; CI installs it ({llamacpp.INSTALL})",
)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# model_type -> (config class, model class, extra config, LoRA targets). The base goes through
# transformers' GGUF reader (as a run's GGUF base does), which takes head_dim as hidden / heads
# and Gemma's query_pre_attn_scalar as 256 (hence Gemma's one 256-wide head), and Qwen3's
# head_dim as 128 (every real Qwen3's), whatever the file's key_length says.
GEMMA = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
}
ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}, ATTN + MLP),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 128}, ATTN + MLP),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA, ATTN + MLP),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA, ATTN + MLP),
    # fused qkv_proj and gate_up_proj
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {},
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
}


def build(model_type: str, tokenizer, hidden: int = 64, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra, _ = ARCHS.get(
        model_type, ("LlamaConfig", "LlamaForCausalLM", {}, None)
    )
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = getattr(transformers, config_cls)(**{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):  # sharp logits
                p.normal_(0, 1.0, generator=g)
            elif p.ndim == 1:  # norms (Gemma's stored as 1 + w) and Qwen2's q/k/v biases
                p.normal_(0, 0.2, generator=g)
    return model


def tuned_run(tmp_path, tokenizer, default_source, model_type: str, **build_args):
    """A run tuned by a LoRA from a GGUF base of this architecture, as gguf-lora needs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from instill.models.resolve import resolve_model

    base = build(model_type, tokenizer, **build_args)
    path = tmp_path / f"tiny-{model_type}.f32.gguf"
    write_gguf(base, tokenizer, path, "f32", name="tiny", base_gguf=default_source.gguf_path)
    source = resolve_model(str(path))
    loaded = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    targets = ARCHS.get(model_type, (None, None, None, ATTN + MLP))[3]
    torch.manual_seed(0)
    model = get_peft_model(loaded, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=g)
    return adapter_run(tmp_path / "run", model, tokenizer, source), source


def _tensors(path) -> dict:
    return {
        t.name: (tuple(int(d) for d in t.shape), t.tensor_type)
        for t in gguf.GGUFReader(str(path)).tensors
    }


@needs_llamacpp
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_each_architecture_round_trips_through_llamacpp(
    tmp_path, tokenizer, default_source, model_type
):
    """Merged and adapter exports, each loaded by llama.cpp, give the tuned model's logits at
    f32 (llama.cpp's tolerance 1e-3) and its every greedy choice; the adapter is a real change
    (llama.cpp on the base alone is far off). Gemma at f16: its f32 files came out of llama.cpp
    2.2e-3 off (logits of about 30), over the 1e-3 f32 check, likely llama.cpp's own GELU
    arithmetic (the other architectures use SiLU and match to 1e-7)."""
    from instill.export.tuned import load_tuned
    from instill.export.verify import compare, from_llamacpp

    run, source = tuned_run(tmp_path, tokenizer, default_source, model_type)
    quant, bound, agreement = (
        ("f16", 0.05, 0.95) if model_type.startswith("gemma") else ("f32", 1e-3, 1.0)
    )
    merged = export_run(run, fmt="gguf", quant=quant)
    adapter = export_run(run, fmt="gguf-lora", quant=quant)
    for result in (merged, adapter):
        f = result.figures
        assert f.verifier.startswith("llama.cpp")
        assert f.max_logit_diff < bound and f.greedy_agreement >= agreement
        assert f.prompt_tokens_identical and f.end_of_turn_survived
    fields = gguf.GGUFReader(str(next(merged.path.glob("*.gguf")))).fields
    arch = SUPPORTED_ARCHS[model_type]
    assert bytes(fields["general.architecture"].parts[-1]).decode() == arch
    engine = llamacpp.open_gguf(source.gguf_path)
    try:
        tuned = load_tuned(run)
        alone = compare(
            tuned.reference,
            tokenizer,
            from_llamacpp(engine, tokenizer, tokenizer.chat_template),
            "f32",
        )
    finally:
        engine.close()
    assert alone.max_logit_diff > 0.03  # 30x the f32 tolerance: the adapter is applied


def test_architecture_details_in_the_file(tmp_path, tokenizer):
    """What each architecture needs written its own way: Qwen2's q/k/v biases, Qwen3's q/k
    norms and head_dim, Gemma's norms stored as 1 + w, Phi-3's fused tensors, and no output
    layer when the head is tied."""
    got = {}
    for model_type in ("qwen2", "qwen3", "gemma2", "phi3"):
        # Qwen3's head_dim 32, not hidden / heads = 16: the file must say so (key_length)
        model = build(model_type, tokenizer, **({"head_dim": 32} if model_type == "qwen3" else {}))
        path = tmp_path / f"{model_type}.gguf"
        write_gguf(model, tokenizer, path, "f32", name="tiny", base_gguf=None)
        reader = gguf.GGUFReader(str(path))
        got[model_type] = (model, {t.name: t for t in reader.tensors}, reader.fields)
    _, qwen2, _ = got["qwen2"]
    assert qwen2["blk.0.attn_q.bias"].data.shape == (64,)
    assert "output.weight" not in qwen2  # tied
    _, qwen3, fields = got["qwen3"]
    assert qwen3["blk.1.attn_k_norm.weight"].data.shape == (32,)
    assert qwen3["output.weight"].data.shape == (len(tokenizer), 64)
    assert fields["qwen3.attention.key_length"].parts[-1][0] == 32
    gemma, gemma_t, fields = got["gemma2"]
    w = gemma.model.layers[1].post_feedforward_layernorm.weight.detach().numpy()
    assert gemma_t["blk.0.attn_q.weight"].data.shape == (256, 256)
    assert (gemma_t["blk.1.post_ffw_norm.weight"].data == w + 1.0).all()
    assert "gemma2.attn_logit_softcapping" in fields
    _, phi3, _ = got["phi3"]
    assert phi3["blk.0.attn_qkv.weight"].data.shape == (64 + 2 * 32, 64)
    assert phi3["blk.0.ffn_up.weight"].data.shape == (2 * 128, 64)


def test_other_architectures_are_refused_with_the_supported_list(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    with pytest.raises(InstillError, match="'gpt2' is not supported.*qwen2, qwen3, gemma2"):
        write_gguf(model, tokenizer, tmp_path / "x.gguf", "f32", name="x", base_gguf=None)
    assert not (tmp_path / "x.gguf").exists()


@needs_llamacpp
@pytest.mark.parametrize("quant,ktype", [("q4_k_m", "Q4_K"), ("q6_k", "Q6_K")])
def test_k_quants_are_written_by_llamacpps_quantizer(
    tmp_path, tokenizer, default_source, quant, ktype, capfd
):
    """Rows 256 wide (one K-quant block): llama.cpp's own quantizer writes the K type (Q4_K_M
    with its own per-tensor rules: some attn_v / ffn_down at Q6_K), the file is verified by
    llama.cpp, and instill.json records what the quantizer wrote; no f32 file is left behind.
    The quantizer's own log (a line per tensor) is not printed; the figures are, with a
    quantised type's logit difference said to be reported only."""
    run, _ = tuned_run(tmp_path, tokenizer, default_source, "llama", hidden=256)
    capfd.readouterr()
    result = export_run(run, fmt="gguf", quant=quant, min_agreement=0.0)
    printed = capfd.readouterr()
    assert "llama_model_quantize" not in printed.err + printed.out
    assert "(reported only), greedy agreement" in " ".join(printed.out.split())
    [path] = result.path.glob("*.gguf")
    assert path.name == f"run.{quant}.gguf"
    tensors = _tensors(path)
    kinds = {t.name for _, t in tensors.values()}
    assert ktype in kinds
    assert tensors["blk.0.attn_q.weight"][1].name == ktype
    if quant == "q4_k_m":  # llama.cpp's Q4_K_M mix, not one type everywhere
        assert "Q6_K" in kinds
    manifest = json.loads((result.path / "instill.json").read_text())
    recorded = manifest["export"]["llamacpp_quantizer"]
    assert recorded["tensor_types"][ktype.lower()] >= 1 and recorded["imatrix"] is None
    assert recorded["fallback_tensors"] == 0
    assert manifest["export"]["quant"] == quant
    assert manifest["verification"]["verifier"].startswith("llama.cpp")
    assert result.figures.positions > 0  # verified (figures reported, not held to a floor here)


@needs_llamacpp
def test_a_failed_quantization_says_what_llamacpp_logged(tmp_path, capfd):
    """The quantizer's log is kept out of the terminal, so a failure must carry its end."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(InstillError, match=r"(?s)quantizer failed .*invalid magic"):
        llamacpp.quantize(bad, tmp_path / "out.gguf", "q4_k_m", "--quant q4_k_m")
    assert "invalid magic" not in capfd.readouterr().err


@needs_llamacpp
def test_rows_narrower_than_a_k_block_fall_back_and_say_so(
    tmp_path, tokenizer, default_source, capsys
):
    run, _ = tuned_run(tmp_path, tokenizer, default_source, "llama")  # rows 64 and 128 wide
    result = export_run(run, fmt="gguf", quant="q4_k_m", min_agreement=0.0)
    recorded = json.loads((result.path / "instill.json").read_text())["export"]
    [path] = result.path.glob("*.gguf")
    matrices = [name for name, (shape, _) in _tensors(path).items() if len(shape) == 2]
    assert recorded["llamacpp_quantizer"]["fallback_tensors"] == len(matrices) >= 15
    assert "q4_k" not in recorded["llamacpp_quantizer"]["tensor_types"]
    assert "not a multiple of 256 columns" in capsys.readouterr().out


def test_k_quants_without_llamacpp_say_how_to_install_it(tmp_path, tokenizer, monkeypatch):
    import builtins

    from tests.test_export import _fake_run

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    run = _fake_run(tmp_path, tokenizer)
    with pytest.raises(InstillError, match=r"--quant q4_k_m .*pip install .*llamacpp"):
        export_run(run, fmt="gguf", quant="q4_k_m")
    assert not (run / "export").exists()
