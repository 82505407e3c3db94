"""The suites a recipe (or `instill eval`) names, built into tasks, and run in one go."""

from __future__ import annotations

import re
from pathlib import Path

from instill.config import EvalConfig, Recipe, SuiteConfig
from instill.console import console
from instill.data.dataset import load_conversations
from instill.errors import InstillError
from instill.eval.results import (
    BASE_PREFIX,
    RUN_RESULTS,
    check_same_split,
    evaluation_folder,
    read_summary,
    run_of,
)
from instill.eval.runner import SuiteResult, evaluate, load_result, task_split, write_result
from instill.eval.tasks import (
    Task,
    builtin_task,
    conversations_task,
    file_task,
    general_gen_task,
    general_task,
)
from instill.rundir import RunSplit, split_of


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
    cfg, b, split = recipe.eval, recipe.data.builtin, split_of(recipe)
    tasks = []
    for suite in cfg.suites:
        if suite == "builtin" and (b is None or b.eval_per_family == 0):
            continue  # no built-in data, nothing of it to hold out: the suite is skipped
        if suite == "data":
            tasks.append(data_task(recipe))
        elif isinstance(suite, str):
            tasks.append(named_task(suite, split))
        else:
            tasks.append(suite_file_task(suite, recipe.data.seed))
    return tasks


def named_task(name: str, split: RunSplit) -> Task | None:
    """The task a shipped suite's name stands for (builtin, general, general_gen), drawn on
    `split`; None for any other name."""
    if name == "builtin":
        return builtin_task(split.per_family, split.seed, split.families, split.holdout)
    if name == "general":
        return general_task()
    if name == "general_gen":
        return general_gen_task(split.general_gen_per_kind)
    return None


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
    from instill.anchors import base_replies
    from instill.models.load import model_digest

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


def evaluation_folder_for(
    model: str,
    run_dir: Path | None,
    output: Path | None,
    name: str | None,
    replace: bool,
    tasks: list[Task],
    changed: dict,
) -> Path:
    """Where `instill eval` writes. A run's own before/after in <run>/eval/ is never replaced
    unless `replace` asks for it by name (and then only on the run's split: its base results
    must still pair); otherwise a run's evaluation goes beside it, to <run>/evals/<name>/, the
    name given or made of the suites and the options that differ from the run's (`changed`)."""
    if output is not None and output.name == RUN_RESULTS and run_of(str(output.parent)):
        raise InstillError(
            f"--output {output}: that is a run's own results (what compare and report read); "
            "evaluate the run without --output to write beside them, or with "
            "--replace-run-results (and no --output) to replace them"
        )
    if run_dir is None:
        if name is not None or replace:
            flag = "--name" if name is not None else "--replace-run-results"
            raise InstillError(f"{flag}: {model} is not a run directory (one with final/)")
        return output or Path("runs") / RUN_RESULTS
    if replace:
        if output is not None or name is not None:
            raise InstillError(
                "--replace-run-results writes to the run's eval/: drop --output and --name"
            )
        if changed:  # the run's base results were scored on its own settings: keep them paired
            given = ", ".join(f"{k} {v}" for k, v in changed.items())
            raise InstillError(
                f"--replace-run-results: the run's base results in {run_dir / RUN_RESULTS} were "
                f"scored with the run's own split and settings, and this evaluation differs "
                f"({given}); drop those options, or write beside them (without the flag)"
            )
        folder = run_dir / RUN_RESULTS
        for task in tasks:
            base = read_summary(folder, f"{BASE_PREFIX}{task.name}")
            if base is not None:
                mine = {"split": task_split(task), "holdout_clusters": sorted(task.holdout)}
                where = str(folder / f"{BASE_PREFIX}{task.name}.json")
                check_same_split(base, mine, where, f"this evaluation of {task.name}")
        return folder
    if output is not None:
        if name is not None:
            raise InstillError("--output and --name both say where to write: give one")
        return output
    return evaluation_folder(run_dir, name or evaluation_name(tasks, changed))


def evaluation_name(tasks: list[Task], changed: dict) -> str:
    """builtin, builtin+general_gen, builtin.per_family-4.seed-1: the suites, then each option
    that differs from the run's own, as a folder name."""
    parts = ["+".join(t.name for t in tasks)]
    parts += [f"{k}-{v}" for k, v in changed.items()]
    return re.sub(r"[^A-Za-z0-9_.,+=-]", "_", ".".join(parts))
