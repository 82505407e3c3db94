"""`instill export RUN`: write the tuned model, verify it by reloading, write instill.json.

    hf         merged safetensors (and/or the peft adapter), reloaded by plain transformers
    gguf       merged GGUF: one type, or `--quant auto` (per-tensor types, export/mixed.py)
    gguf-lora  a llama.cpp LoRA adapter GGUF, applied at run time on the run's base GGUF
GGUF files are written and verified in gguf_export.py: by llama.cpp itself when the extra is
installed, by transformers' GGUF reader otherwise, with an Ollama Modelfile and llama-server.sh.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from instill.atomic import atomic_directory, refuse_to_replace
from instill.console import out
from instill.data.render import end_of_turn_ids
from instill.errors import InstillError
from instill.export import gguf_export, gguf_file, gguf_lora
from instill.export.tuned import Tuned, final_dir, load_tuned
from instill.export.verify import Figures, check, compare, from_transformers
from instill.infer import llamacpp
from instill.rundir import RunDir

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
        "data": _read_json(RunDir(run).data_stats),
        "data_sources": _data_sources(tuned.run_config),
        "config": tuned.run_config,
        "run_record": RunDir(run).record(),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "end_of_turn_ids": end_of_turn_ids(tuned.tokenizer),
        "libraries": _versions(),
        "verification": figures.as_dict() if figures else None,
    }


def _tolerance(limit: float | None) -> str:
    """The logit tolerance as printed: quantised types are held to agreement only."""
    return "reported only" if limit is None else f"tolerance {limit:g}"


def _print(figures: Figures, what: str) -> None:
    out.print(
        f"verify {what} with {figures.verifier}: max |logit diff| {figures.max_logit_diff:.3g} "
        f"({_tolerance(figures.logit_tolerance)}), greedy agreement "
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
    copy_base: bool = False,
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
    if copy_base and fmt != "gguf-lora":
        raise InstillError(
            "--copy-base: for --format gguf-lora only (a merged GGUF already holds the whole model)"
        )
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise InstillError(f"--min-agreement {min_agreement}: give a share between 0 and 1")
    if output is not None and output.exists() and not overwrite:
        raise InstillError(f"{output}: already exists; pass --overwrite to replace it")
    if output is not None:  # before any work: never the run, the working directory, home, root
        keep = {"the run directory": run, "the run's tuned model": RunDir(run).final}
        refuse_to_replace(output, "--output", keep=keep)
    tuned = load_tuned(run, dequantize=dequantize)
    if fmt == "gguf":
        gguf_file.check_arch(tuned.merged.config)
        quant = quant or gguf_file.source_quant(tuned.source.gguf_path) or "f16"
        if quant in gguf_file.LLAMACPP_QUANTS:  # before any work: the quantizer is llama.cpp's
            llamacpp.require(f"--quant {quant} (written by llama.cpp's own quantizer)")
        if quant == gguf_file.AUTO and max_size_mb is not None:
            gguf_export.check_auto_size(tuned, max_size_mb)
    elif fmt == "gguf-lora":
        gguf_file.check_arch(tuned.merged.config)
        quant = quant or "f16"
        if tuned.adapter is not None:  # refusals before any file is written
            gguf_lora.check_adapter(tuned.adapter)
            gguf_lora.base_gguf(run, tuned.source)
    if output is None:
        output = RunDir(run).export(f"{fmt}-{dtype if fmt == 'hf' else quant}")
        if output.exists() and not overwrite:
            raise InstillError(f"{output}: already exists; pass --overwrite to replace it")
    extra: dict = {}
    with atomic_directory(output, "export", "--output") as tmp:
        if fmt == "hf":
            figures = _write_hf(tuned, tmp, dtype, parts)
            what = f"hf {dtype}"
        elif fmt == "gguf":
            figures, extra = gguf_export.write_merged(tuned, tmp, quant, run, max_size_mb)
            what = f"gguf {quant}"
        else:
            figures, extra = gguf_export.write_adapter(tuned, tmp, quant, run, copy_base)
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
        out.print(
            f"score it as deployed (shown in instill report {run}): instill eval {output} "
            "--engine llama.cpp"
        )
    return ExportResult(output, figures)
