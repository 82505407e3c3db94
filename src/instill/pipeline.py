"""A run, start to end: load, evaluate the base, tune, save, evaluate again, report.

prepare_run_dir -> load_model -> build_data -> evaluate (before)
  -> attach_adapter -> train -> save final/ -> evaluate (after) -> report
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from instill.config import Recipe
from instill.console import console
from instill.data.dataset import build_data
from instill.errors import InstillError
from instill.eval import SuiteResult, evaluate_builtin, write_result
from instill.models import attach_adapter, load_model
from instill.train import TrainResult, train
from instill.train.checkpoint import save_model_dir


@dataclass
class RunSummary:
    run_dir: Path
    train: TrainResult
    before: SuiteResult | None
    after: SuiteResult | None
    wall_s: float
    model: object = None  # the tuned model, still in memory (peft-wrapped for adapters)
    tokenizer: object = None


def prepare_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    run_dir = Path(recipe.train.output_dir) / recipe.name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            state = "a finished run" if (run_dir / "final").exists() else "an unfinished run"
            raise InstillError(
                f"{run_dir} already holds {state}; pass --overwrite to replace it or choose "
                "another name (name=...)"
            )
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InstillError(
            f"run directory {run_dir} is not writable ({exc.strerror}); set train.output_dir "
            "to a folder you can write"
        ) from None
    return run_dir


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_recipe(recipe: Recipe, *, overwrite: bool = False) -> RunSummary:
    from instill.report import write_report

    t0 = time.perf_counter()
    run_dir = prepare_run_dir(recipe, overwrite)
    try:  # a mistake found while setting up leaves no half-made run directory behind
        _write_yaml(run_dir / "config.yaml", recipe.model_dump(mode="json"))
        loaded = load_model(recipe.model, seed=recipe.train.seed)
        data = build_data(loaded.tokenizer, recipe.data)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    console.print(
        f"[bold]run[/bold] {run_dir}: model {recipe.model.name} ({loaded.source.kind}) on "
        f"{loaded.device}, {loaded.dtype}"
    )
    stats = data.stats
    (run_dir / "data_stats.json").write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    if data.skipped:
        with open(run_dir / "skipped_rows.jsonl", "w") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in data.skipped)
        console.print(
            f"[yellow]skipped {len(data.skipped)} bad rows[/yellow] (data.on_error: skip); "
            f"each one and why: {run_dir / 'skipped_rows.jsonl'}"
        )
    console.print(
        f"data: {stats.rows} rows, {stats.tokens:,} tokens, {stats.trained_tokens:,} trained, "
        f"{stats.validation_rows} validation rows"
        + (f", dropped {stats.dropped}" if stats.dropped else "")
    )
    suite_data = recipe.data.builtin
    evaluate = suite_data is not None and "builtin" in recipe.eval.suites
    before = after = None
    if evaluate and recipe.eval.before:
        console.print("evaluating the base model...")
        before = evaluate_builtin(loaded.model, loaded.tokenizer, suite_data, recipe.eval, "base")
        write_result(before, run_dir / "eval", "base-builtin")
    model, report = attach_adapter(loaded.model, recipe.adapter)
    console.print(str(report))
    pack = recipe.data.max_length if recipe.data.packing else None
    result = train(
        model,
        loaded.tokenizer,
        data.train,
        recipe.train,
        run_dir,
        pack_length=pack,
        validation=data.validation,
    )
    save_model_dir(model, loaded.tokenizer, run_dir / "final")
    if evaluate and recipe.eval.after:
        console.print("evaluating the tuned model...")
        after = evaluate_builtin(model, loaded.tokenizer, suite_data, recipe.eval, "tuned")
        write_result(after, run_dir / "eval", "builtin")
    summary = RunSummary(
        run_dir, result, before, after, time.perf_counter() - t0, model, loaded.tokenizer
    )
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "name": recipe.name,
                "model": {
                    "name": recipe.model.name,
                    "kind": loaded.source.kind,
                    "path": loaded.source.path,
                    "sha256": loaded.source.sha256,
                    "device": str(loaded.device),
                    "dtype": str(loaded.dtype).removeprefix("torch."),
                },
                "params": {"trainable": report.trainable, "total": report.total},
                "train": result.as_dict(),
                "data": stats.as_dict(),
                "eval_before": before.summary() if before else None,
                "eval_after": after.summary() if after else None,
                "wall_s": round(summary.wall_s, 2),
            },
            indent=2,
        )
        + "\n"
    )
    write_report(run_dir)
    return summary
