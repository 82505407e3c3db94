"""The suites a recipe (or `instill eval`) names, built into tasks, and run in one go."""

from __future__ import annotations

from pathlib import Path

from instill.config import EvalConfig, Recipe, SuiteConfig
from instill.console import console
from instill.data.dataset import load_conversations
from instill.errors import InstillError
from instill.eval.runner import SuiteResult, evaluate, load_result, write_result
from instill.eval.tasks import (
    Task,
    builtin_task,
    conversations_task,
    file_task,
    general_gen_task,
    general_task,
)


def data_task(recipe: Recipe) -> Task:
    """The recipe's own rows the model did not train on: its validation rows (seen clusters) and
    every row of the held-out clusters (unseen), at most eval.max_per_cluster of each cluster."""
    holdout = frozenset(recipe.eval.holdout_clusters)
    heldout: list = []
    _, val, _ = load_conversations(recipe.data, None, holdout, heldout)
    if not val and not heldout:
        raise InstillError(
            "eval.suites: data: no rows to evaluate; set data.validation (a fraction or a file) "
            "or eval.holdout_clusters"
        )
    metric = recipe.eval.data_metric
    return conversations_task(
        "data",
        val + heldout,
        metric="rouge_l" if metric == "auto" else metric,
        holdout=holdout,
        max_per_cluster=recipe.eval.max_per_cluster,
        seed=recipe.data.seed,
    )


def build_tasks(recipe: Recipe) -> list[Task]:
    cfg = recipe.eval
    tasks = []
    for suite in cfg.suites:
        if suite == "builtin":
            b = recipe.data.builtin
            if b is None or b.eval_per_family == 0:
                continue  # no built-in data, nothing of it to hold out: the suite is skipped
            tasks.append(builtin_task(b.eval_per_family, b.seed, b.families, cfg.holdout_clusters))
        elif suite == "general":
            tasks.append(general_task())
        elif suite == "general_gen":
            tasks.append(general_gen_task(cfg.general_gen_per_kind))
        elif suite == "data":
            tasks.append(data_task(recipe))
        else:
            tasks.append(suite_file_task(suite, recipe.data.seed))
    return tasks


def suite_file_task(suite: SuiteConfig, seed: int = 0) -> Task:
    task = file_task(
        suite.name,
        suite.path,
        metric=suite.metric,
        fmt=suite.format,
        max_examples=suite.max_examples,
        seed=seed,
    )
    task.max_new_tokens = suite.max_new_tokens
    return task


def attach_anchors(model, tokenizer, tasks: list[Task], cfg: EvalConfig, digest=None) -> None:
    """Give every drift-scored task the base model's replies to its prompts (generated once,
    then read from the cache). `model` is the base model; call before it is tuned."""
    from instill.eval.drift import base_replies, model_digest

    drift = [t for t in tasks if t.metric == "drift"]
    if drift and digest is None:
        digest = model_digest(model)
    for task in drift:
        task.anchor = base_replies(
            model,
            tokenizer,
            task.examples,
            task.max_new_tokens or cfg.gen_max_new_tokens,
            cfg.batch_size,
            digest=digest,
        )


def run_tasks(
    model,
    tokenizer,
    tasks: list[Task],
    cfg: EvalConfig,
    model_name: str,
    folder: Path,
    prefix: str = "",
    reuse: bool = False,
) -> dict[str, SuiteResult]:
    """Evaluate every task and write <folder>/<prefix><suite>.json(l). reuse: keep results
    already written (a resumed run does not evaluate its base model twice)."""
    results = {}
    for task in tasks:
        stem = f"{prefix}{task.name}"
        found = load_result(folder, stem) if reuse else None
        if found is not None:
            results[task.name] = found
            continue
        console.print(f"evaluating {model_name} on {task.name} ({len(task.examples)} examples)...")
        result = evaluate(
            model,
            tokenizer,
            task,
            cfg,
            model_name,
            loss=task.metric not in ("choice", "builtin", "drift"),
        )
        write_result(result, folder, stem)
        results[task.name] = result
    return results
