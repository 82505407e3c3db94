"""Write a Llama-family model as a GGUF file llama.cpp can run, with the gguf package.

Tensor names follow llama.cpp's `blk.N.*` scheme. Q and K projections are stored with llama.cpp's
rotary row order (pairs interleaved per head); transformers' GGUF reader undoes exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from instill.errors import InstillError

SUPPORTED_ARCHS = {"llama": "llama", "mistral": "llama"}  # model_type -> GGUF architecture
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


AUTO = "auto"  # per-tensor types chosen by measurement (export/mixed.py)


def check_quant(quant: str) -> None:
    if quant not in QUANTS and quant != AUTO:
        raise InstillError(
            f"--quant {quant}: not a type this export writes; choose one of "
            f"{', '.join(QUANTS)} or {AUTO}"
        )


def check_arch(config) -> str:
    arch = SUPPORTED_ARCHS.get(config.model_type)
    if arch is None:
        raise InstillError(
            f"--format gguf: architecture '{config.model_type}' is not supported by the GGUF "
            f"writer; supported: {', '.join(SUPPORTED_ARCHS)} (use --format hf instead)"
        )
    return arch


def source_quant(gguf_path: str | None) -> str | None:
    """The quantisation a GGUF base came in, so a Q4_1 file in gives a Q4_1 file out."""
    if not gguf_path:
        return None
    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get("general.file_type")
    if field is None:
        return None
    ftype = int(field.parts[field.data[0]][0])
    for name, (_, file_type) in QUANTS.items():
        if int(file_type) == ftype:
            return name
    return None


def _rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    # HF keeps each head's rotary halves apart; llama.cpp interleaves them
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def gguf_name(name: str, config) -> str | None:
    """llama.cpp's name for a tensor of an HF Llama state dict; None for one it does not store
    (a tied output head, rotary frequencies)."""
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else "output.weight"
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        module, _, kind = rest.rpartition(".")
        if kind == "weight" and module in _LAYER:
            return f"blk.{idx}.{_LAYER[module]}.weight"
    elif name.endswith("rotary_emb.inv_freq"):
        return None
    raise InstillError(f"--format gguf: tensor {name} has no GGUF mapping")


def rotary_rows(w: np.ndarray, gguf_tensor: str, config) -> np.ndarray:
    """Q and K rows in llama.cpp's rotary order (for a LoRA pair: B's rows); others unchanged."""
    if gguf_tensor.endswith(".attn_q.weight"):
        return _rotary_rows(w, config.num_attention_heads)
    if gguf_tensor.endswith(".attn_k.weight"):
        return _rotary_rows(w, config.num_key_value_heads)
    return w


def hf_rows(w: np.ndarray, gguf_tensor: str, config) -> np.ndarray:
    """The inverse of rotary_rows: llama.cpp's Q and K row order back to transformers'."""
    heads = (
        config.num_attention_heads
        if gguf_tensor.endswith(".attn_q.weight")
        else config.num_key_value_heads
        if gguf_tensor.endswith(".attn_k.weight")
        else None
    )
    if heads is None:
        return w
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def tensors(model, config):
    for name, t in model.state_dict().items():
        tensor = gguf_name(name, config)
        if tensor is not None:
            yield tensor, rotary_rows(t.detach().float().cpu().numpy(), tensor, config)


def add_tensor(writer, name: str, w: np.ndarray, qtype) -> None:
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    # norms stay f32 (as llama.cpp's converter does); rows a block cannot divide fall back to f16
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16 or w.shape[-1] % block:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)


def _tensor_type(name: str, qtype):
    """4-bit files keep the embedding (also the output layer when tied) at q8_0, as llama.cpp's
    own Q4 files do (SmolLM2's Q4_1 file among them): 4-bit logits would drift by whole units."""
    four_bit = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
    if qtype in four_bit and name in ("token_embd.weight", "output.weight"):
        return gguf.GGMLQuantizationType.Q8_0
    return qtype


def merges(tokenizer) -> list[str]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _add_tokenizer(writer, tokenizer, pre: str) -> None:
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise InstillError("--format gguf: the tokenizer's ids are not contiguous")
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    types = [
        gguf.TokenType.CONTROL
        if i in special
        else gguf.TokenType.USER_DEFINED
        if tok in added
        else gguf.TokenType.NORMAL
        for tok, i in by_id
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([tok for tok, _ in by_id])
    writer.add_token_types(types)
    writer.add_token_merges(merges(tokenizer))
    for setter, tid in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if tid is not None:
            setter(tid)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def _source_pre(gguf_path: str | None) -> str:
    if gguf_path:
        field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode()
    return "default"


def write_gguf(
    model,
    tokenizer,
    path: Path,
    quant: str,
    *,
    name: str,
    base_gguf: str | None,
    plan: dict | None = None,
):
    """plan (--quant auto): GGUF tensor name -> (type, raw bytes to copy or None) for every
    2-D tensor; 1-D tensors stay f32."""
    config = model.config
    arch = check_arch(config)
    check_quant(quant)
    if quant == AUTO:
        if plan is None:
            raise ValueError("quant auto needs a plan")
        qtype, file_type = None, gguf.LlamaFileType.GUESSED
    else:
        qtype, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    _add_tokenizer(writer, tokenizer, _source_pre(base_gguf))
    for tname, w in tensors(model, config):
        if plan is None or w.ndim == 1:  # 1-D tensors (norms) are written as f32 either way
            f32 = gguf.GGMLQuantizationType.F32
            add_tensor(writer, tname, w, _tensor_type(tname, qtype) if plan is None else f32)
            continue
        ttype, raw = plan[tname]
        if raw is not None:  # the base file's own bytes, exactly
            writer.add_tensor(tname, raw, raw_dtype=ttype)
        else:
            add_tensor(writer, tname, w, ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf(path: Path):
    """transformers' own GGUF reader: an independent loader for verification."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from instill.models.resolve import quiet_gguf_reader

    with quiet_gguf_reader():
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
