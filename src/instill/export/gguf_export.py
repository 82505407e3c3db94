"""The GGUF side of `instill export`: write the file, verify it, and put what runs it beside it.

    write_merged   merged model -> one GGUF (one type, or --quant auto's per-tensor types)
    write_adapter  LoRA adapter -> llama.cpp adapter GGUF for the run's base GGUF
Each is verified by llama.cpp in-process when the llamacpp extra is installed (the merged file
alone, or the base with the adapter applied); otherwise transformers' GGUF reader checks a
merged file and the gguf reader plus transformers an adapter, and the printout says so. An
Ollama Modelfile and llama-server.sh are written beside either (deploy.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

from instill.console import out
from instill.errors import InstillError
from instill.export import deploy, gguf_file, gguf_lora
from instill.export.tuned import Tuned
from instill.export.verify import (
    TOLERANCE,
    Figures,
    compare,
    from_llamacpp,
    from_transformers,
    looseness,
)
from instill.infer import llamacpp

DEFAULT_AUTO_BITS = 5.5  # --quant auto without --max-size: average bits per weight


def _gguf_verifier(what: str) -> bool:
    """llama.cpp when the extra is installed; else say which check ran instead."""
    if llamacpp.available():
        return True
    out.print(
        f"note: llama.cpp is not installed, so {what} is checked with transformers' GGUF reader "
        f"instead of the program that will run it; install the extra: {llamacpp.INSTALL}"
    )
    return False


def _verify_llamacpp(tuned: Tuned, model: Path, lora: Path | None, kind: str):
    """A merged file is rendered with the template written into it; an adapter with the tuned
    model's own (llama-server.sh passes it, as the base file may hold another)."""
    engine = llamacpp.open_gguf(model, lora=lora, what="the export's verification")
    template = (
        tuned.tokenizer.chat_template
        if lora
        else engine.metadata.get("tokenizer.chat_template", "")
    )
    try:
        return compare(
            tuned.reference, tuned.tokenizer, from_llamacpp(engine, tuned.tokenizer, template), kind
        )
    finally:
        engine.close()


def write_merged(
    tuned: Tuned, tmp: Path, quant: str, run: Path, max_size_mb: float | None
) -> tuple[Figures, dict]:
    path = tmp / f"{run.name}.{quant}.gguf"
    extra: dict = {"file": path.name}
    plan = None
    if quant == gguf_file.AUTO:
        from instill.export import mixed

        budget = _auto_budget(tuned, max_size_mb)
        choices = mixed.plan(tuned.merged, tuned.tokenizer, tuned.source.gguf_path, budget)
        plan = mixed.as_plan(choices)
        extra["auto"] = {"budget_bytes": budget, **mixed.summary(choices)}
        kinds = "; ".join(
            f"{kind} " + ", ".join(f"{n}x {t}" for t, n in sorted(types.items()))
            for kind, types in extra["auto"]["by_kind"].items()
        )
        out.print(f"auto types (tensor data budget {budget / 1e6:.1f} MB): {kinds}")
    by_llamacpp = quant in gguf_file.LLAMACPP_QUANTS
    gguf_file.write_gguf(
        tuned.merged,
        tuned.tokenizer,
        tmp / f"{run.name}.f32.gguf" if by_llamacpp else path,
        "f32" if by_llamacpp else quant,
        name=run.name,
        base_gguf=tuned.source.gguf_path,
        plan=plan,
    )
    if by_llamacpp:
        extra["llamacpp_quantizer"] = _quantize(tmp / f"{run.name}.f32.gguf", path, quant)
    extra["size_bytes"] = path.stat().st_size
    out.print(f"wrote {path.name}: {path.stat().st_size / 1e6:.1f} MB")
    if _gguf_verifier("the GGUF file"):
        figures = _verify_llamacpp(tuned, path, None, quant)
    else:
        reloaded, tok = gguf_file.load_gguf(path)
        figures = compare(
            tuned.reference,
            tuned.tokenizer,
            from_transformers(reloaded, tok, tuned.tokenizer, "transformers GGUF reader"),
            quant,
        )
    extra["note"] = deploy.write_beside(tmp, tuned.tokenizer, Path(path.name), None, str(run))
    return figures, extra


def _quantize(source: Path, path: Path, quant: str) -> dict:
    """The f32 file through llama.cpp's quantizer (then removed); what it wrote, by tensor type.
    K-quants (and iq4) work in blocks of 256 columns: llama.cpp gives a tensor whose rows are
    not a multiple of that a fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, ...), and
    the printout says how many."""
    llamacpp.quantize(source, path, quant, f"--quant {quant}")
    source.unlink()
    types: dict[str, int] = {}
    fallback = 0
    k_block = quant.startswith("iq") or "_k" in quant
    for t in gguf.GGUFReader(str(path)).tensors:
        types[t.tensor_type.name.lower()] = types.get(t.tensor_type.name.lower(), 0) + 1
        fallback += bool(k_block and len(t.shape) == 2 and int(t.shape[0]) % 256)
    listed = ", ".join(f"{n}x {t}" for t, n in sorted(types.items()))
    out.print(f"quantised by llama.cpp to {quant} (from f32, no importance matrix): {listed}")
    if fallback:
        out.print(
            f"note: {fallback} weight tensors have rows that are not a multiple of 256 columns "
            f"(K-quant blocks), so llama.cpp wrote them in a fallback type"
        )
    return {"from": "f32", "imatrix": None, "tensor_types": types, "fallback_tensors": fallback}


def check_auto_size(tuned: Tuned, max_size_mb: float) -> None:
    """Refuse, before anything is written, a --max-size no file --quant auto writes can meet
    (its plan would keep every tensor at its cheapest type and still write over the budget)."""
    from instill.export import mixed

    least = mixed.smallest_bytes(tuned.merged, tuned.source.gguf_path)
    if _auto_budget(tuned, max_size_mb) < least:
        smallest = least + _metadata_bytes(tuned.tokenizer, _tensor_names(tuned))
        mb = math.ceil(smallest / 1e5) / 10  # rounded up: a --max-size that works
        raise InstillError(
            f"--max-size {max_size_mb:g}: the smallest file --quant auto can write for this "
            f"model is {mb:.1f} MB (every tensor at its cheapest type, norms f32, with the "
            f"vocabulary and headers); give --max-size {mb:.1f} or more"
        )


def _tensor_names(tuned: Tuned) -> list[str]:
    config = tuned.merged.config
    return [t for t in (gguf_file.gguf_name(n, config) for n in tuned.merged.state_dict()) if t]


def _auto_budget(tuned: Tuned, max_size_mb: float | None) -> int:
    """Bytes of tensor data --quant auto may spend: --max-size less what the file holds besides
    (vocabulary, merges, template, tensor headers), or DEFAULT_AUTO_BITS a weight."""
    config = tuned.merged.config
    if max_size_mb is not None:
        return int(max_size_mb * 1e6) - _metadata_bytes(tuned.tokenizer, _tensor_names(tuned))
    params = sum(
        p.numel() for n, p in tuned.merged.state_dict().items() if gguf_file.gguf_name(n, config)
    )
    return int(params * DEFAULT_AUTO_BITS / 8)


def _metadata_bytes(tokenizer, tensors: list[str]) -> int:
    vocab = sum(len(t.encode()) + 12 for t in tokenizer.get_vocab())
    merges = sum(len(m.encode()) + 8 for m in gguf_file.merges(tokenizer))
    # a tensor's header (name, dims, type, offset) and its data's alignment padding, at most
    headers = sum(len(t) + 48 + 32 for t in tensors)
    return vocab + merges + len((tokenizer.chat_template or "").encode()) + headers + 4096


def _copy_base(base, folder: Path) -> tuple[Path, str]:
    """The base GGUF put into the export folder: hardlinked when the folder is on its filesystem
    (no second copy on disk), else copied; either way its sha256 is checked against the run's,
    so the folder holds exactly the file the adapter was verified on."""
    import os
    import shutil

    from instill.models.resolve import sha256_file

    dest = folder / base.path.name
    try:
        os.link(base.path, dest)
        how = "hardlinked"
    except OSError:  # another filesystem, or links not allowed there
        shutil.copyfile(base.path, dest)
        how = "copied"
    if sha256_file(dest) != base.sha256:
        raise InstillError(
            f"--copy-base: the base GGUF {how} into the export has another sha256 than "
            f"{base.path} ({base.sha256}); check the disk, or export without --copy-base"
        )
    return dest, how


def write_adapter(
    tuned: Tuned, tmp: Path, quant: str, run: Path, copy_base: bool = False
) -> tuple[Figures, dict]:
    if tuned.adapter is None:
        raise InstillError(
            "--format gguf-lora: this run is a full fine-tune, it has no adapter; export "
            "--format gguf instead"
        )
    base = gguf_lora.base_gguf(run, tuned.source)
    path = tmp / f"{run.name}.lora-{quant}.gguf"
    alpha, note = gguf_lora.write_lora_gguf(tuned.adapter, path, quant, name=run.name, base=base)
    if note:
        out.print(f"note: {note}")
    base_quant = gguf_file.source_quant(str(base.path))
    kind = _adapter_kind(quant, base_quant)
    out.print(
        f"wrote {path.name}: {path.stat().st_size / 1e6:.1f} MB, alpha {alpha:g}, for the base "
        f"{base.path} ({base.path.stat().st_size / 1e6:.1f} MB, sha256 {base.sha256[:12]}...)"
    )
    base_file = base.path
    if copy_base:
        base_file, how = _copy_base(base, tmp)
        size = base_file.stat().st_size / 1e6
        extra_disk = "no extra disk" if how == "hardlinked" else f"{size:.1f} MB more on disk"
        out.print(
            f"base GGUF {how} into the export as {base_file.name} ({size:.1f} MB, {extra_disk}; "
            "sha256 checked): the folder runs wherever it is moved"
        )
    if _gguf_verifier("the adapter"):
        figures = _verify_llamacpp(tuned, base_file, path, kind)
    else:
        figures = _verify_lora_fallback(tuned, path, kind)
    extra = {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "lora_alpha": alpha,
        "alpha_note": note,
        "tolerance_of": kind,
        "base_gguf": {
            "path": str(base.path),
            "sha256": base.sha256,
            "size_bytes": base.path.stat().st_size,
            "type": base_quant,
            "file": base_file.name if copy_base else None,  # in the export folder
        },
    }
    model = Path(base_file.name) if copy_base else base.path
    extra["note"] = deploy.write_beside(tmp, tuned.tokenizer, model, path.name, str(run))
    return figures, extra


def _adapter_kind(quant: str, base_quant: str | None) -> str:
    """The adapter is held to its own type's tolerance, or the base file's when that is looser
    (both models run the base's rounding, but llama.cpp's kernels also round activations)."""
    base_quant = base_quant if base_quant in TOLERANCE else "f16"
    return max(quant, base_quant, key=looseness)


def _verify_lora_fallback(tuned: Tuned, path: Path, kind: str) -> Figures:
    """Without llama.cpp: the adapter file read back by the gguf reader and added to the base
    (loaded by plain transformers), so names, shapes, row order and alpha are still checked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tuned.source.path, dtype=torch.float32).eval()
    _, updates = gguf_lora.read_lora_gguf(path)
    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = gguf_file.gguf_name(name, config)
            if tensor in updates:
                delta = gguf_file.hf_rows(updates.pop(tensor), tensor, config)
                param.add_(torch.from_numpy(np.ascontiguousarray(delta)))
    if updates:
        raise InstillError(f"{path.name}: tensors with no base weight: {', '.join(updates)}")
    reloaded = from_transformers(
        model,
        tuned.tokenizer,
        tuned.tokenizer,
        "gguf reader + transformers (llama.cpp not installed)",
    )
    return compare(tuned.reference, tuned.tokenizer, reloaded, kind)
