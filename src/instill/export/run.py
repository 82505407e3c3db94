"""`instill export RUN`: write the tuned model, verify it by reloading, write instill.json.

    hf         merged safetensors (and/or the peft adapter), reloaded by plain transformers
    gguf       merged GGUF: one type, or `--quant auto` (per-tensor types, export/mixed.py)
    gguf-lora  a llama.cpp LoRA adapter GGUF, applied at run time on the run's base GGUF
GGUF files are verified by llama.cpp itself when the extra is installed (models/llamacpp.py),
by transformers' GGUF reader otherwise; an Ollama Modelfile and llama-server.sh go beside them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instill.atomic import atomic_directory, refuse_to_replace
from instill.console import out
from instill.data.render import end_of_turn_ids
from instill.errors import InstillError
from instill.export import deploy, gguf_file, gguf_lora
from instill.export.tuned import Tuned, final_dir, load_tuned
from instill.export.verify import Figures, check, compare, from_llamacpp, from_transformers
from instill.models import llamacpp

DEFAULT_AUTO_BITS = 5.5  # --quant auto without --max-size: average bits per weight
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("merged", "adapter", "both")
FORMATS = ("hf", "gguf", "gguf-lora")
LIBS = (
    "instill",
    "torch",
    "transformers",
    "peft",
    "gguf",
    "safetensors",
    "tokenizers",
    "llama-cpp-python",
)


@dataclass
class ExportResult:
    path: Path
    figures: Figures | None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _versions() -> dict:
    found = {}
    for lib in LIBS:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            found[lib] = None
    return found


def _data_sources(config: dict) -> list[dict]:
    """Each data source the run read, with a sha256 per file (folders: every file in it)."""
    from instill.models.resolve import sha256_file

    found = []
    for src in (config.get("data") or {}).get("sources") or []:
        path = Path(src.get("path", ""))
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found.append(
            {
                "path": str(path),
                "files": {str(f): sha256_file(f) if f.is_file() else None for f in files},
            }
        )
    return found


def _manifest(run: Path, tuned: Tuned, export: dict, figures: Figures | None) -> dict:
    template = tuned.tokenizer.chat_template or ""
    source = tuned.source
    return {
        "export": export,
        "run": str(run.resolve()),
        "base_model": {
            "kind": source.kind,
            "name": source.name,
            "path": source.path,
            "gguf_path": source.gguf_path,
            "sha256": source.sha256,
        },
        "data": _read_json(run / "data_stats.json"),
        "data_sources": _data_sources(tuned.run_config),
        "config": tuned.run_config,
        "run_record": _read_json(run / "run.json"),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "end_of_turn_ids": end_of_turn_ids(tuned.tokenizer),
        "libraries": _versions(),
        "verification": figures.as_dict() if figures else None,
    }


def _print(figures: Figures, what: str) -> None:
    out.print(
        f"verify {what} with {figures.verifier}: max |logit diff| {figures.max_logit_diff:.3g} "
        f"(tolerance {figures.logit_tolerance}), greedy agreement "
        f"{figures.greedy_agreement:.3f} over {figures.positions} positions "
        f"(minimum {figures.agreement_tolerance}), prompt tokens identical "
        f"{figures.prompt_tokens_identical}, end-of-turn kept {figures.end_of_turn_survived}"
    )


def _write_hf(tuned: Tuned, tmp: Path, dtype: str, parts: str) -> Figures | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    figures = None
    if parts in ("adapter", "both"):
        if tuned.adapter is None:
            raise InstillError("--parts adapter: this run is a full fine-tune, it has no adapter")
        target = tmp / "adapter" if parts == "both" else tmp
        tuned.adapter.save_pretrained(str(target))
        tuned.tokenizer.save_pretrained(str(target))
    if parts in ("merged", "both"):
        # a copy: rounding the shared model would also round the reference we compare against
        model = copy.deepcopy(tuned.merged).to(DTYPES[dtype])
        eot = end_of_turn_ids(tuned.tokenizer)
        model.generation_config = GenerationConfig(
            bos_token_id=tuned.tokenizer.bos_token_id,
            eos_token_id=eot,
            pad_token_id=tuned.tokenizer.pad_token_id,
        )
        model.save_pretrained(str(tmp), max_shard_size="2GB")
        tuned.tokenizer.save_pretrained(str(tmp))
        # plain transformers, no instill code: what a user downstream would run
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(tmp))
        figures = compare(
            tuned.reference,
            tuned.tokenizer,
            from_transformers(reloaded, tok, tuned.tokenizer),
            dtype,
        )
    return figures


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


def _write_gguf(
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
    gguf_file.write_gguf(
        tuned.merged,
        tuned.tokenizer,
        path,
        quant,
        name=run.name,
        base_gguf=tuned.source.gguf_path,
        plan=plan,
    )
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


def _auto_budget(tuned: Tuned, max_size_mb: float | None) -> int:
    """Bytes of tensor data --quant auto may spend: --max-size less what the file holds besides
    (vocabulary, merges, template, tensor headers), or DEFAULT_AUTO_BITS a weight."""
    config = tuned.merged.config
    names = [t for t in (gguf_file.gguf_name(n, config) for n in tuned.merged.state_dict()) if t]
    if max_size_mb is not None:
        return int(max_size_mb * 1e6) - _metadata_bytes(tuned.tokenizer, names)
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


def _write_gguf_lora(tuned: Tuned, tmp: Path, quant: str, run: Path) -> tuple[Figures, dict]:
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
    if _gguf_verifier("the adapter"):
        figures = _verify_llamacpp(tuned, base.path, path, kind)
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
        },
    }
    extra["note"] = deploy.write_beside(tmp, tuned.tokenizer, base.path, path.name, str(run))
    return figures, extra


def _adapter_kind(quant: str, base_quant: str | None) -> str:
    """The adapter is held to its own type's tolerance, or the base file's when that is looser
    (both models run the base's rounding, but llama.cpp's kernels also round activations)."""
    order = ["f32", "f16", "q8_0", "q4_0", "q4_1"]
    base_quant = base_quant if base_quant in order else "f16"
    return max(quant, base_quant, key=order.index)


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


def _check_quant(fmt: str, quant: str | None, max_size_mb: float | None) -> None:
    if quant is not None:
        (gguf_lora.check_quant if fmt == "gguf-lora" else gguf_file.check_quant)(quant)
    if max_size_mb is not None and (fmt != "gguf" or quant != gguf_file.AUTO):
        raise InstillError("--max-size: a budget for --format gguf --quant auto only")
    if max_size_mb is not None and max_size_mb <= 0:
        raise InstillError(f"--max-size {max_size_mb}: give a size in MB above 0")


def export_run(
    run: Path,
    *,
    fmt: str = "hf",
    quant: str | None = None,
    dtype: str = "fp32",
    parts: str = "merged",
    output: Path | None = None,
    overwrite: bool = False,
    dequantize: bool = False,
    min_agreement: float | None = None,
    max_size_mb: float | None = None,
) -> ExportResult:
    run = Path(run)
    final_dir(run)
    if fmt not in FORMATS:
        raise InstillError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise InstillError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if parts not in PARTS:
        raise InstillError(f"--parts {parts}: choose one of {', '.join(PARTS)}")
    _check_quant(fmt, quant, max_size_mb)
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise InstillError(f"--min-agreement {min_agreement}: give a share between 0 and 1")
    if output is not None and output.exists() and not overwrite:
        raise InstillError(f"{output}: already exists; pass --overwrite to replace it")
    if output is not None:  # before any work: never the run, the working directory, home, root
        keep = {"the run directory": run, "the run's tuned model": run / "final"}
        refuse_to_replace(output, "--output", keep=keep)
    tuned = load_tuned(run, dequantize=dequantize)
    if fmt == "gguf":
        gguf_file.check_arch(tuned.merged.config)
        quant = quant or gguf_file.source_quant(tuned.source.gguf_path) or "f16"
    elif fmt == "gguf-lora":
        gguf_file.check_arch(tuned.merged.config)
        quant = quant or "f16"
        if tuned.adapter is not None:  # refusals before any file is written
            gguf_lora.check_adapter(tuned.adapter)
            gguf_lora.base_gguf(run, tuned.source)
    if output is None:
        output = run / "export" / f"{fmt}-{dtype if fmt == 'hf' else quant}"
        if output.exists() and not overwrite:
            raise InstillError(f"{output}: already exists; pass --overwrite to replace it")
    extra: dict = {}
    with atomic_directory(output, "export", "--output") as tmp:
        if fmt == "hf":
            figures = _write_hf(tuned, tmp, dtype, parts)
            what = f"hf {dtype}"
        elif fmt == "gguf":
            figures, extra = _write_gguf(tuned, tmp, quant, run, max_size_mb)
            what = f"gguf {quant}"
        else:
            figures, extra = _write_gguf_lora(tuned, tmp, quant, run)
            what = f"gguf-lora {quant}"
        if extra.get("note"):
            out.print(f"note: {extra['note']}")
        if figures is not None:
            if min_agreement is not None:  # the user's own floor, recorded in instill.json
                figures.agreement_tolerance = min_agreement
            _print(figures, what)
            check(figures, what)
        export = {
            "format": fmt,
            "quant": quant,
            "dtype": dtype if fmt == "hf" else None,
            "parts": parts if fmt == "hf" else "merged" if fmt == "gguf" else "adapter",
            **extra,
        }
        manifest = _manifest(run, tuned, export, figures)
        (tmp / "instill.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    out.print(f"exported {what} to {output}")
    if fmt != "hf":
        modelfile, server = output / "Modelfile", output / "llama-server.sh"
        out.print(f"run it: ollama create NAME -f {modelfile}, or {server}")
    return ExportResult(output, figures)
