"""Write a causal LM as a GGUF file llama.cpp can run, with the gguf package.

Tensor names come from the gguf package's tables for the architecture (gguf.TensorNameMap, built
from gguf.MODEL_TENSORS / TENSOR_NAMES, the tables llama.cpp's own converter uses); the metadata
from the model's config. What the tables do not hold is per architecture in ARCHS: which GGUF
architecture a transformers model_type is, whether llama.cpp wants Q and K rows in its
interleaved rotary order (Llama's "normal" rope; the others use NeoX rope, transformers' order),
and whether norm weights are stored with Gemma's +1 (transformers' Gemma norms compute
x * (1 + w), llama.cpp's compute x * w). Fused tensors (Phi-3's qkv and gate_up) and biases
(Qwen2's q/k/v) map through the tables as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch

from instill.errors import InstillError


@dataclass(frozen=True)
class Arch:
    gguf: gguf.MODEL_ARCH
    rotary_rows: bool = False  # Q/K rows interleaved per head (llama.cpp's LLAMA rope type)
    norm_plus_one: bool = False  # norm weights stored as 1 + w (Gemma)


ARCHS = {  # transformers model_type -> how llama.cpp runs it
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, rotary_rows=True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, rotary_rows=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3),
    "gemma2": Arch(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True),
    "gemma3_text": Arch(gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True),
    "phi3": Arch(gguf.MODEL_ARCH.PHI3),
}
SUPPORTED_ARCHS = {t: gguf.MODEL_ARCH_NAMES[a.gguf] for t, a in ARCHS.items()}
ROPE_TYPES = ("default", "linear")  # rope scalings written as llama.cpp metadata
QUANTS = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
# written at f32, then quantised by llama.cpp's own quantizer (llama_model_quantize): the types
# llama-quantize offers that need no importance matrix
LLAMACPP_QUANTS = {
    name: getattr(gguf.LlamaFileType, f"MOSTLY_{name.upper()}")
    for name in (
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_k_s",
        "q4_k_m",
        "q5_k_s",
        "q5_k_m",
        "q6_k",
        "q5_0",
        "q5_1",
        "iq4_nl",
        "iq4_xs",
    )
}


AUTO = "auto"  # per-tensor types chosen by measurement (export/mixed.py)


def check_quant(quant: str) -> None:
    if quant not in QUANTS and quant not in LLAMACPP_QUANTS and quant != AUTO:
        raise InstillError(
            f"--quant {quant}: not a type this export writes; choose one of "
            f"{', '.join(QUANTS)}, {AUTO}, or (quantised by llama.cpp) "
            f"{', '.join(LLAMACPP_QUANTS)}"
        )


def _arch(config) -> Arch:
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise InstillError(
            f"--format gguf: architecture '{config.model_type}' is not supported by the GGUF "
            f"writer; supported: {', '.join(SUPPORTED_ARCHS)} (use --format hf instead)"
        )
    return arch


def _rope(config) -> tuple[dict, dict | None]:
    """(rope parameters of full-attention layers, of sliding ones when they differ: Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    if not params.get("rope_theta") and getattr(config, "rope_theta", None):
        params["rope_theta"] = config.rope_theta
    return params, None


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_arch(config) -> str:
    """The GGUF architecture name, after refusing what llama.cpp would run differently."""
    arch = _arch(config)
    for params in filter(None, _rope(config)):
        kind = params.get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise InstillError(
                f"--format gguf: this model's rope scaling '{kind}' (config rope_parameters) is "
                f"not written by the GGUF writer (it writes {', '.join(ROPE_TYPES)}); export "
                "--format hf and convert with llama.cpp's convert_hf_to_gguf.py"
            )
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if arch.norm_plus_one and scalar is not None and scalar != head_dim(config):
        raise InstillError(
            f"--format gguf: query_pre_attn_scalar {scalar} differs from head_dim "
            f"{head_dim(config)}; llama.cpp scales Gemma's attention by 1/sqrt(head_dim) "
            "(export --format hf instead)"
        )
    if arch.gguf == gguf.MODEL_ARCH.GEMMA2 and not config.tie_word_embeddings:
        raise InstillError(
            "--format gguf: llama.cpp's Gemma 2 has no output layer of its own (it reuses the "
            "embeddings), and this model's is untied; export --format hf instead"
        )
    return gguf.MODEL_ARCH_NAMES[arch.gguf]


@cache
def _scalar_fields(path: str, mtime_ns: int, size: int) -> dict:
    """A GGUF file's scalar metadata. Parsing a file's fields reads its whole vocabulary (tens
    of seconds for the default model on a busy machine), so it is done once per file version."""
    reader = gguf.GGUFReader(path)
    found = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        found[key] = (
            bytes(value).decode()
            if field.types[0] == gguf.GGUFValueType.STRING
            else (value[0].item())
        )
    return found


def gguf_field(path: str, key: str):
    stat = Path(path).stat()
    return _scalar_fields(str(path), stat.st_mtime_ns, stat.st_size).get(key)


def source_quant(gguf_path: str | None) -> str | None:
    """The quantisation a GGUF base came in, so a Q4_1 file in gives a Q4_1 file out (and a
    Q4_K_M file, quantised by llama.cpp, a Q4_K_M file)."""
    if not gguf_path:
        return None
    ftype = gguf_field(gguf_path, "general.file_type")
    if ftype is None:
        return None
    for name, (_, file_type) in QUANTS.items():
        if int(file_type) == ftype:
            return name
    for name, file_type in LLAMACPP_QUANTS.items():
        if int(file_type) == ftype:
            return name
    return None


def _rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    # HF keeps each head's rotary halves apart; llama.cpp interleaves them
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


@cache
def _name_map(arch: gguf.MODEL_ARCH, layers: int) -> gguf.TensorNameMap:
    return gguf.TensorNameMap(arch, layers)


def gguf_name(name: str, config) -> str | None:
    """llama.cpp's name for a tensor of a transformers state dict; None for one it does not
    store (a tied output head, rotary frequencies)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    table = _name_map(_arch(config).gguf, config.num_hidden_layers)
    found = table.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise InstillError(
            f"--format gguf: tensor {name} has no GGUF name for llama.cpp's "
            f"{check_arch(config)} architecture"
        )
    return found


def _rotary_heads(gguf_tensor: str, config) -> int | None:
    if not _arch(config).rotary_rows:
        return None
    if gguf_tensor.endswith(".attn_q.weight"):
        return config.num_attention_heads
    if gguf_tensor.endswith(".attn_k.weight"):
        return config.num_key_value_heads
    return None


def rotary_rows(w: np.ndarray, gguf_tensor: str, config) -> np.ndarray:
    """Q and K rows in llama.cpp's rotary order where the architecture wants it (for a LoRA
    pair: B's rows); others unchanged."""
    heads = _rotary_heads(gguf_tensor, config)
    return w if heads is None else _rotary_rows(w, heads)


def hf_rows(w: np.ndarray, gguf_tensor: str, config) -> np.ndarray:
    """The inverse of rotary_rows: llama.cpp's Q and K row order back to transformers'."""
    heads = _rotary_heads(gguf_tensor, config)
    if heads is None:
        return w
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def tensors(model, config):
    plus_one = _arch(config).norm_plus_one
    for name, t in model.state_dict().items():
        tensor = gguf_name(name, config)
        if tensor is not None:
            w = rotary_rows(t.detach().float().cpu().numpy(), tensor, config)
            if plus_one and tensor.endswith("norm.weight"):
                w = w + 1.0
            yield tensor, w


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
    return (gguf_field(gguf_path, "tokenizer.ggml.pre") if gguf_path else None) or "default"


def add_hparams(writer, config) -> None:
    """The architecture's hyperparameters, from the config, under llama.cpp's keys."""
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(dim)  # Qwen3 and Gemma: head_dim is not hidden / heads
    writer.add_value_length(dim)
    full, sliding = _rope(config)
    partial = full.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0)
    writer.add_rope_dimension_count(int(dim * (partial or 1.0)))
    writer.add_rope_freq_base(float(full.get("rope_theta") or 10000.0))
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if sliding is not None and sliding.get("rope_theta"):
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    # read only by the architectures that have them (Gemma, Phi-3); Qwen2's window is off
    # unless use_sliding_window says otherwise
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        writer.add_sliding_window(window)
    for key, setter in (
        ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", writer.add_final_logit_softcapping),
    ):
        if getattr(config, key, None):
            setter(float(getattr(config, key)))


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
    writer.add_name(name)
    add_hparams(writer, config)
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
