"""Load a run's tuned model twice over: as trained (base + adapter) and merged for export."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from instill.config import ModelConfig, Recipe
from instill.errors import InstillError
from instill.models import load_adapter_model, load_model
from instill.models.resolve import ModelSource, resolve_model
from instill.rundir import RunDir


@dataclass
class Tuned:
    reference: torch.nn.Module  # what was trained: base + unmerged adapter, or the full model
    merged: torch.nn.Module  # plain transformers model to write out
    tokenizer: object
    source: ModelSource
    adapter: object | None  # the PeftModel, for the adapter-only export
    run_config: dict


def run_recipe(run: Path) -> Recipe | None:
    """The run's recipe through the typed schema (RunDir), or None when it has no config.yaml."""
    rd = RunDir(run)
    return rd.recipe() if rd.config.is_file() else None


def final_dir(run: Path) -> Path:
    final = RunDir(run).final
    if not final.is_dir():
        raise InstillError(
            f"{run}: no final/ directory, so there is no tuned model to export; finish the run "
            "(instill train ...) or point at a run directory that has final/"
        )
    return final


def load_tuned(run: Path, *, dequantize: bool = False) -> Tuned:
    final = final_dir(run)
    recipe = run_recipe(run)
    cfg = recipe.model_dump(mode="json") if recipe is not None else {}
    quantize = (recipe or Recipe()).model.quantize
    adapter_file = final / "adapter_config.json"
    if adapter_file.is_file() and quantize == "4bit" and not dequantize:
        raise InstillError(
            f"{RunDir(run).config}: model.quantize is 4bit, so the adapter was trained against a "
            "4-bit NF4 base; merging it into that base would round the merged weights to 4 bits "
            "again and lose the adapter's update. Pass --dequantize to merge into the base "
            "dequantised to full precision, or export the adapter alone (--parts adapter)"
        )
    model_cfg = ModelConfig(name=str(final), dtype="float32", device="cpu")
    if not adapter_file.is_file():
        loaded = load_model(model_cfg)
        loaded.model.eval()
        return Tuned(loaded.model, loaded.model, loaded.tokenizer, loaded.source, None, cfg)
    # quantize none: on request we merge into the full-precision base (the dequantised weights)
    loaded = load_adapter_model(final, model_cfg, quantize="none")
    reference, source = loaded.model, _run_source(run, loaded.source)
    merged = copy.deepcopy(reference).merge_and_unload().eval()
    return Tuned(reference, merged, loaded.tokenizer, source, reference, cfg)


def _run_source(run: Path, loaded: ModelSource) -> ModelSource:
    """The base as the run recorded it: a GGUF base loads from its cached conversion, but its
    provenance (and the default export type) is the original .gguf file."""
    record = RunDir(run).record().get("model") or {}
    if record.get("kind") != "gguf" or record.get("path") != loaded.path:
        return loaded
    try:
        return resolve_model(record["name"])
    except InstillError:
        return loaded
