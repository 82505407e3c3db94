"""`instill eval FILE.gguf --engine llama.cpp [--lora ADAPTER.gguf]`: score the deployed
artifact itself, as llama-server would answer.

    infer/llamacpp.target(model, lora): a .gguf file, or an export folder (its instill.json
    names the files; an adapter's base GGUF must still have the sha256 recorded there)
    each prompt: chat template -> text -> llama.cpp's tokenizer -> greedy decode (llama.cpp's
    one loop, shared with serve: infer/llamacpp.LlamaCpp.run) -> text -> the same scorers as
    every other evaluation

The template is the export's chat_template.jinja when there is one (what llama-server.sh
passes), else --chat-template, else the one inside the GGUF file.

An export folder of a run (RUN/export/NAME, or any folder whose instill.json names the run) is
scored on the run's own held-out split by default and recorded in RUN/eval/deployed/NAME/, with
the export's type, size and verification, so the run report can set the deployed artifact's
score beside the in-memory one (deployed()).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from instill.config import EvalConfig
from instill.console import console
from instill.errors import InstillError
from instill.eval.runner import (
    SuiteResult,
    check_renders,
    generation_records,
    task_split,
    write_result,
)
from instill.eval.tasks import Task
from instill.infer import llamacpp
from instill.infer.engine import GenParams, Job
from instill.infer.generate import Generation, generation_of
from instill.rundir import RunDir, RunSplit


def export_run_dir(model: str) -> Path | None:
    """The run an export folder was made from (its instill.json's run, when that still holds a
    tuned model), else None."""
    manifest = Path(model) / "instill.json"
    if not manifest.is_file():
        return None
    run = json.loads(manifest.read_text()).get("run")
    return Path(run) if run and RunDir(Path(run)).finished else None


def run_split(run: Path) -> RunSplit:
    """The run's own split, from its recipe read through the typed schema (RunDir)."""
    return RunDir(run).split()


def deployed_record(folder: Path) -> dict:
    """What the run report needs of an export: its kind, size, verification, and the sha256 of
    its instill.json (a later export into the same folder makes the score stale)."""
    raw = (folder / "instill.json").read_bytes()
    manifest = json.loads(raw)
    export = manifest.get("export") or {}
    base = export.get("base_gguf") or {}
    return {
        "export": str(folder.resolve()),
        "format": export.get("format"),
        "quant": export.get("quant"),
        "size_bytes": export.get("size_bytes"),
        "base_size_bytes": base.get("size_bytes"),
        "verification": manifest.get("verification"),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }


def _generate(engine, tokenizer, task: Task, cfg: EvalConfig) -> tuple[list[Generation], dict]:
    """Each prompt's greedy reply, decoded by llama.cpp's one loop (infer/llamacpp.py)."""
    gens, decoded, decode_s = [], 0, 0.0
    params = GenParams(max_new_tokens=task.max_new_tokens or cfg.max_new_tokens)
    for ex in task.examples:
        job = Job(engine.chat_ids(tokenizer, ex.prompt), params, live=False)
        decode_s += engine.run(job)
        gen = generation_of(job)
        gens.append(gen)
        # the first token comes from the prompt's pass; the rest are decode steps
        decoded += max(0, len(gen.token_ids) - 1)
    speed = {
        "decode_tokens": decoded,
        "decode_s": round(decode_s, 3),
        "decode_tokens_per_s": round(decoded / decode_s, 1) if decode_s else None,
    }
    return gens, speed


def run_llamacpp(
    model: str,
    lora: str | None,
    tasks: list[Task],
    cfg: EvalConfig,
    folder: Path,
    chat_template: Path | None = None,
) -> dict[str, SuiteResult]:
    t = llamacpp.target(model, lora)
    for task in tasks:
        if task.metric in ("choice", "drift"):
            raise InstillError(
                f"suite {task.name}: scored by log-likelihood or against a base model's "
                "replies, which --engine llama.cpp does not do; it scores generated answers "
                "(builtin, and files with text metrics)"
            )
    engine, tokenizer = llamacpp.open_target(t, chat_template, n_ctx=2048)
    results = {}
    try:
        for task in tasks:
            if not task.examples:
                raise InstillError(f"suite {task.name}: no examples to evaluate")
            check_renders(tokenizer, task)
            console.print(
                f"evaluating {t.label} with llama.cpp on {task.name} "
                f"({len(task.examples)} examples)..."
            )
            start = time.perf_counter()
            gens, speed = _generate(engine, tokenizer, task, cfg)
            result = SuiteResult(
                task.name,
                t.label,
                generation_records(task, gens),
                time.perf_counter() - start,
                metric=task.metric,
                holdout=sorted(task.holdout),
                split=task_split(task),
                extra={
                    "engine": engine.name,
                    **speed,
                    **({"deployed": deployed_record(t.export)} if t.export else {}),
                },
            )
            write_result(result, folder, task.name)
            results[task.name] = result
    finally:
        engine.close()
    return results
