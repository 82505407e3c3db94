"""Write a run's LoRA adapter as a llama.cpp adapter GGUF, applied at run time on the base GGUF.

    check_adapter(peft model)   refuse what llama.cpp cannot apply; the alpha it must be given
    base_gguf(run, source)      the exact base file: path and sha256, as the run recorded them
    write_lora_gguf(...)        general.type=adapter, adapter.type=lora, adapter.lora.alpha;
                                tensors `<base tensor>.lora_a` (r x in) and `.lora_b` (out x r)

llama.cpp adds scale * B(A x) to each matched base tensor, with scale = alpha / r and r read from
B's shape, so one alpha must hold for every pair. B's rows of Q and K take llama.cpp's rotary
order, as the base file's Q and K rows do (gguf_file.rotary_rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from instill.errors import InstillError
from instill.export import gguf_file
from instill.rundir import RunDir

QUANTS = ("f32", "f16", "q8_0")
TIED_OR_HEAD = ("embed_tokens", "lm_head")


@dataclass
class BaseGGUF:
    path: Path
    sha256: str


@dataclass
class Pair:
    tensor: str  # the base tensor llama.cpp applies it to
    a: np.ndarray  # r x in
    b: np.ndarray  # out x r, rows in llama.cpp's order


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise InstillError(
            f"--quant {quant}: a LoRA adapter GGUF is written as {', '.join(QUANTS)}"
        )


def base_gguf(run: Path, source) -> BaseGGUF:
    """The base GGUF the adapter applies to; refused when the run's base is not a GGUF file or
    the file there is no longer the one the run was tuned from."""
    if source.kind != "gguf" or not source.gguf_path:
        raise InstillError(
            f"--format gguf-lora: llama.cpp applies an adapter to a base GGUF file, and this "
            f"run's base is not one ({source.name}, a {source.kind} model); tune from a .gguf "
            "base, or export the merged model with --format gguf"
        )
    recorded = RunDir(run).record().get("model") or {}
    expected = recorded.get("sha256")
    if expected and expected != source.sha256:
        raise InstillError(
            f"--format gguf-lora: {source.gguf_path} has sha256 {source.sha256}, but the run was "
            f"tuned from a base with sha256 {expected} (run.json); put that exact file back at "
            f"{source.gguf_path}, since the adapter only reproduces the tuned model on it"
        )
    return BaseGGUF(Path(source.gguf_path), source.sha256)


def _layers(peft_model):
    """Every module the adapter changes, by its name in the base model."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield name.removeprefix("base_model.model."), module


def check_adapter(peft_model) -> tuple[float, str | None]:
    """Refuse what llama.cpp cannot apply; return the alpha to write and, for rsLoRA, a note
    that says how it was rescaled."""
    cfg = peft_model.peft_config["default"]
    why = "llama.cpp's LoRA adapters only add scale * B(A x) to base weights"
    if str(cfg.peft_type) not in ("LORA", "PeftType.LORA"):
        raise InstillError(f"--format gguf-lora: a {cfg.peft_type} adapter is not LoRA; {why}")
    if getattr(cfg, "use_dora", False):
        raise InstillError(
            f"--format gguf-lora: this adapter is DoRA (adapter use_dora), which also rescales "
            f"each weight column by a learned magnitude; {why}. Export the merged model instead "
            "(--format gguf)"
        )
    if cfg.bias != "none" or getattr(cfg, "lora_bias", False):
        raise InstillError(
            f"--format gguf-lora: this adapter trains biases (bias: {cfg.bias}); {why}. Export "
            "the merged model instead (--format gguf)"
        )
    if cfg.modules_to_save or getattr(cfg, "trainable_token_indices", None):
        raise InstillError(
            "--format gguf-lora: this adapter also trains whole modules or token rows "
            f"(modules_to_save / trainable_token_indices); {why}. Export the merged model "
            "instead (--format gguf)"
        )
    alphas: dict[float, list[str]] = {}
    for name, module in _layers(peft_model):
        if name.rpartition(".")[2] in TIED_OR_HEAD:
            raise InstillError(
                f"--format gguf-lora: the adapter has a LoRA pair on {name} (the embeddings or "
                "the output head, tied in this model family); llama.cpp cannot apply it to the "
                "base file's tied tensor. Export the merged model instead (--format gguf)"
            )
        if "default" not in module.lora_A:  # an embedding or convolution LoRA
            raise InstillError(
                f"--format gguf-lora: {name} is a {type(module).__name__} LoRA; llama.cpp "
                "adapters hold linear pairs only. Export the merged model instead (--format gguf)"
            )
        # llama.cpp scales by alpha / r with r from B's shape: alpha = peft's scaling * r
        alpha = float(module.scaling["default"]) * module.r["default"]
        alphas.setdefault(round(alpha, 5), []).append(name)
    if not alphas:
        raise InstillError("--format gguf-lora: the adapter has no LoRA pairs")
    if len(alphas) > 1:
        listed = "; ".join(f"{a:g}: {names[0]} (+{len(names) - 1})" for a, names in alphas.items())
        raise InstillError(
            "--format gguf-lora: llama.cpp gives every pair one scale alpha / r, and this "
            f"adapter's pairs need different alphas ({listed}: alpha_pattern, or rsLoRA with "
            "rank_pattern); export the merged model instead (--format gguf)"
        )
    alpha = next(iter(alphas))
    note = None
    if getattr(cfg, "use_rslora", False):
        r = next(iter(m.r["default"] for _, m in _layers(peft_model)))
        note = (
            f"rsLoRA scales by alpha/sqrt(r) = {cfg.lora_alpha:g}/sqrt({r}); llama.cpp scales by "
            f"alpha/r, so adapter.lora.alpha is written rescaled to {cfg.lora_alpha:g}*sqrt({r})"
            f" = {alpha:g}"
        )
    return alpha, note


def pairs(peft_model) -> list[Pair]:
    config = peft_model.get_base_model().config
    found = []
    for name, module in _layers(peft_model):
        tensor = gguf_file.gguf_name(f"{name}.weight", config)
        if tensor is None:
            raise InstillError(f"--format gguf-lora: {name} has no tensor in the base GGUF")
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()
        found.append(Pair(tensor, a, gguf_file.rotary_rows(b, tensor, config)))
    return found


def write_lora_gguf(
    peft_model, path: Path, quant: str, *, name: str, base: BaseGGUF
) -> tuple[float, str | None]:
    check_quant(quant)
    alpha, note = check_adapter(peft_model)
    config = peft_model.get_base_model().config
    arch = gguf_file.check_arch(config)
    qtype = gguf_file.QUANTS[quant][0]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    writer.add_file_type(int(gguf_file.QUANTS[quant][1]))
    # the base this adapter reproduces the tuned model on, for whoever holds only this file
    writer.add_string("instill.base.file", base.path.name)
    writer.add_string("instill.base.sha256", base.sha256)
    for pair in pairs(peft_model):
        gguf_file.add_tensor(writer, f"{pair.tensor}.lora_a", pair.a, qtype)
        gguf_file.add_tensor(writer, f"{pair.tensor}.lora_b", pair.b, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return alpha, note


def read_lora_gguf(path: Path) -> tuple[float, dict[str, np.ndarray]]:
    """alpha and each base tensor's update scale * B @ A, in GGUF row order (the fallback check
    when llama.cpp is not installed)."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    alpha = float(field.parts[field.data[0]][0])
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = w.reshape(tuple(int(d) for d in reversed(t.shape)))
    updates = {}
    for key, a in tensors.items():
        if key.endswith(".lora_a"):
            base = key.removesuffix(".lora_a")
            b = tensors[f"{base}.lora_b"]
            updates[base] = (alpha / b.shape[1] if alpha else 1.0) * (b @ a)
    return alpha, updates
