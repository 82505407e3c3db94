"""`instill export RUN`: write the tuned model, verify it by reloading, write instill.json."""

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
from instill.export import gguf_file
from instill.export.tuned import Tuned, final_dir, load_tuned
from instill.export.verify import Figures, check, compare

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("merged", "adapter", "both")
LIBS = ("instill", "torch", "transformers", "peft", "gguf", "safetensors", "tokenizers")


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
        found.append({
            "path": str(path),
            "files": {str(f): sha256_file(f) if f.is_file() else None for f in files},
        })
    return found


def _manifest(run: Path, tuned: Tuned, export: dict, figures: Figures | None) -> dict:
    template = tuned.tokenizer.chat_template or ""
    source = tuned.source
    return {
        "export": export,
        "run": str(run.resolve()),
        "base_model": {"kind": source.kind, "name": source.name, "path": source.path,
                       "gguf_path": source.gguf_path, "sha256": source.sha256},
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
        f"verify {what}: max |logit diff| {figures.max_logit_diff:.3g} "
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
            bos_token_id=tuned.tokenizer.bos_token_id, eos_token_id=eot,
            pad_token_id=tuned.tokenizer.pad_token_id,
        )
        model.save_pretrained(str(tmp), max_shard_size="2GB")
        tuned.tokenizer.save_pretrained(str(tmp))
        # plain transformers, no instill code: what a user downstream would run
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(tmp))
        figures = compare(tuned.reference, tuned.tokenizer, reloaded, tok, dtype)
    return figures


def _write_gguf(tuned: Tuned, tmp: Path, quant: str, run: Path) -> Figures:
    path = tmp / f"{run.name}.{quant}.gguf"
    gguf_file.write_gguf(
        tuned.merged, tuned.tokenizer, path, quant, name=run.name,
        base_gguf=tuned.source.gguf_path,
    )
    reloaded, tok = gguf_file.load_gguf(path)
    return compare(tuned.reference, tuned.tokenizer, reloaded, tok, quant)


def export_run(
    run: Path, *, fmt: str = "hf", quant: str | None = None, dtype: str = "fp32",
    parts: str = "merged", output: Path | None = None, overwrite: bool = False,
    dequantize: bool = False, min_agreement: float | None = None,
) -> ExportResult:
    run = Path(run)
    final_dir(run)
    if fmt not in ("hf", "gguf"):
        raise InstillError(f"--format {fmt}: choose hf or gguf")
    if dtype not in DTYPES:
        raise InstillError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if parts not in PARTS:
        raise InstillError(f"--parts {parts}: choose one of {', '.join(PARTS)}")
    if quant is not None:
        gguf_file.check_quant(quant)
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
    if output is None:
        output = run / "export" / f"{fmt}-{dtype if fmt == 'hf' else quant}"
        if output.exists() and not overwrite:
            raise InstillError(f"{output}: already exists; pass --overwrite to replace it")
    with atomic_directory(output, "export", "--output") as tmp:
        if fmt == "hf":
            figures = _write_hf(tuned, tmp, dtype, parts)
            what = f"hf {dtype}"
        else:
            figures = _write_gguf(tuned, tmp, quant, run)
            what = f"gguf {quant}"
        if figures is not None:
            if min_agreement is not None:  # the user's own floor, recorded in instill.json
                figures.agreement_tolerance = min_agreement
            _print(figures, what)
            check(figures, what)
        export = {"format": fmt, "quant": quant, "dtype": dtype if fmt == "hf" else None,
                  "parts": parts if fmt == "hf" else "merged"}
        manifest = _manifest(run, tuned, export, figures)
        (tmp / "instill.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    out.print(f"exported {what} to {output}")
    return ExportResult(output, figures)
