"""A run, start to end, in stages that every process walks through in the same order.

    run_recipe(recipe)
        acc = make_accelerator(recipe)      the run's one Accelerator, passed down
        run = setup(acc, recipe, ...)       run directory, model, data (+ replay rows: the base's
                                            own replies), suites; every process
        evaluate_before(run)                base validation loss and suites; main process only
        train(...)                          train/loop.py; every process
        final/                              saved by the main process
        evaluate after, report(...)         main process only; the others are done

Each stage's phases are timed by the run's one Phases clock (run.json's `phases`, printed at the
end of the run and in the report, with the time no phase holds).

Only the main process writes files and evaluates. Where it works alone, every process calls
on_main (train/loop.py) at the same point, so the barriers that keep the others waiting are
matched by construction; main_process_first lets it fill the caches before the others read them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from instill import rundir
from instill.atomic import leftover_of, refuse_to_replace, remove_directory, write_text
from instill.config import Recipe
from instill.console import console
from instill.data.dataset import build_data
from instill.errors import InstillError
from instill.eval import SuiteResult
from instill.eval.suites import attach_anchors, build_tasks, run_tasks
from instill.jsonl import write_jsonl
from instill.models import attach_adapter, load_model, pick_device
from instill.models.adapters import merged_for_evaluation
from instill.rundir import RunDir
from instill.train import TrainResult, train
from instill.train.checkpoint import (
    check_resumable,
    complete_checkpoints,
    resume_info,
    save_model_dir,
)
from instill.train.logs import Metrics
from instill.train.loop import on_main


class Phases:
    """Seconds per named phase of a run, in the order they ran, and the run's wall clock: one
    clock for both, so the breakdown and the total add up (the remainder is what no phase
    holds: imports, process setup, checks)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            spent = self.seconds.get(name, 0.0) + time.perf_counter() - t
            self.seconds[name] = round(spent, 3)

    def wall(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class RunSummary:
    run_dir: Path
    train: TrainResult
    before: dict[str, SuiteResult]  # suite name -> result of the untuned model
    after: dict[str, SuiteResult]
    wall_s: float
    model: object = None  # the tuned model, still in memory (peft-wrapped for adapters)
    tokenizer: object = None
    main: bool = True  # False in the non-main processes of a multi-process run
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase (Phases)


def check_mixed_precision(recipe: Recipe) -> None:
    """An accelerate configuration's mixed_precision (ACCELERATE_MIXED_PRECISION) must agree
    with model.dtype: instill keeps float32 master weights under bf16/fp16 autocast when the
    weights are bf16/fp16, and "no" leaves that to model.dtype."""
    import os
    import warnings

    from instill.models.load import pick_dtype
    from instill.train.loop import precision_mode

    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    device = pick_device(recipe.model.device)
    with warnings.catch_warnings():  # (load_model gives the CPU half-precision warning once)
        warnings.simplefilter("ignore")
        dtype = pick_dtype(recipe.model.dtype, device)
    mode = precision_mode(dtype)
    if asked not in ("no", mode):
        raise InstillError(
            f"the accelerate configuration has mixed_precision: {asked} but model.dtype "
            f"{recipe.model.dtype} gives {str(dtype).removeprefix('torch.')} weights on {device}; "
            f"set mixed_precision: {mode} in the accelerate configuration, or model.dtype to "
            "match it (for float32 weights under bf16 autocast: mixed_precision: no and "
            "train.autocast: bf16)"
        )


def make_accelerator(recipe: Recipe):
    """The run's one Accelerator (train.loop.make_accelerator), once the accelerate
    configuration's mixed precision is checked against model.dtype."""
    from instill.train.loop import make_accelerator as build

    check_mixed_precision(recipe)
    cpu = pick_device(recipe.model.device).type == "cpu"
    return build(cpu, recipe.train.barrier_timeout_min)


def plan_run_dir(recipe: Recipe, overwrite: bool) -> tuple[Path, Path | None, bool]:
    """Check the run directory without touching it: (run directory, checkpoint to resume from,
    whether an existing directory must be cleared). Raises for a run that must not be replaced.
    Every process of a multi-process run calls this before any of them changes anything."""
    run_dir = Path(recipe.train.output_dir) / recipe.name
    resume = recipe.train.resume
    checkpoint = None
    if resume is not None and not overwrite:
        if RunDir(run_dir).final.exists():
            raise InstillError(f"{run_dir} holds a finished run; nothing to resume")
        if resume == "auto":
            found = complete_checkpoints(RunDir(run_dir).checkpoints)
            checkpoint = found[-1] if found else None
        else:
            checkpoint = Path(resume)
            resume_info(checkpoint)  # a clear error now for best/, final/ or a cut-short write
    existed = run_dir.exists() and any(run_dir.iterdir())
    if existed and checkpoint is None and not overwrite and resume is None:
        state = "a finished run" if RunDir(run_dir).final.exists() else "an unfinished run"
        raise InstillError(
            f"{run_dir} already holds {state}; pass --overwrite to replace it, "
            "train.resume=auto to continue it, or choose another name (name=...)"
        )
    # --overwrite, or resume=auto with nothing to resume from: start afresh
    if existed and checkpoint is None:  # never the working directory, home or a root
        refuse_to_replace(run_dir, "train.output_dir or name")
        if not overwrite:  # resume=auto clears only what an earlier start of this run wrote
            check_restartable(run_dir, recipe.name)
    return run_dir, checkpoint, existed and checkpoint is None


RUN_ENTRIES = rundir.ENTRIES  # what `instill train` (and export, report) writes in a run


def _written_by_instill(config: Path, name: str) -> bool:
    """config.yaml as setup writes it: a recipe (only Recipe's sections) named `name`."""
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return (
        isinstance(data, dict)
        and data.get("name") == name
        and {"model", "train"} <= data.keys() <= set(Recipe.model_fields)
    )


def check_restartable(run_dir: Path, name: str) -> None:
    """Refuse to clear `run_dir` for a fresh start unless it holds an instill run (config.yaml
    written for this run) and nothing but what a run writes (and the hidden leftovers of its
    killed writes): a folder that holds anything else is the user's, named in the error."""
    fix = "or choose another name (name=...) or train.output_dir"
    if not _written_by_instill(RunDir(run_dir).config, name):
        raise InstillError(
            f"{run_dir} holds no instill run (no config.yaml written by instill train for "
            f"{name}), so train.resume=auto will not clear it to start afresh; move its files "
            f"away, {fix}"
        )
    unknown = sorted(
        e for e in os.listdir(run_dir) if e not in RUN_ENTRIES and leftover_of(e) not in RUN_ENTRIES
    )
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InstillError(
            f"{run_dir} holds files instill does not write ({', '.join(unknown[:5])}{more}), so "
            f"train.resume=auto will not clear it to start afresh; move them away, {fix}"
        )


def make_run_dir(run_dir: Path, clear: bool) -> None:
    """Clear (when asked) and create the run directory, checking that it is writable."""
    try:
        if clear:
            remove_directory(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InstillError(
            f"run directory {run_dir} is not writable ({exc.strerror}); set train.output_dir "
            "to a folder you can write"
        ) from None


def data_digest(data) -> str:
    """sha256 of the tokenised training and validation rows, in order, with their masks: the
    same digest means the same batches in the same order."""
    import hashlib

    import numpy as np

    from instill.data.preference_tokens import hash_row

    h = hashlib.sha256()
    for part in (data.train, data.validation):
        h.update(len(part).to_bytes(8, "little"))
        for row in part:
            if hasattr(row, "input_ids"):  # a supervised row (hashed as it always was)
                h.update(np.asarray(row.input_ids, dtype=np.int64).tobytes())
                h.update(np.asarray(row.mask, dtype=np.int8).tobytes())
                h.update(b"r" if row.replay else b"-")
                continue
            hash_row(h, row)
    return h.hexdigest()


def fingerprint(recipe: Recipe, data=None, processes: int = 1) -> dict:
    """What a checkpoint and the run resuming from it must agree on: model, adapter, batching,
    the data's content and the number of processes (which sets each step's rows)."""
    t, d = recipe.train, recipe.data
    objective = {}
    if t.objective != "sft":  # (absent for sft, so checkpoints of earlier versions still resume)
        objective = {"objective": t.objective, "preference": t.preference.model_dump(mode="json")}
    return {
        **objective,
        "model": recipe.model.model_dump(mode="json"),
        "adapter": recipe.adapter.model_dump(mode="json"),
        "batching": {
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "seed": t.seed,
            "packing": d.packing,
            "max_length": d.max_length,
            "processes": processes,
        },
        "data": {"sha256": data_digest(data) if data is not None else None},
    }


def during_training(recipe: Recipe, tasks, tokenizer):
    """The evaluator of eval.during_training: its suite's primary score on a fixed sample."""
    name = recipe.eval.during_training
    if name is None:
        return None
    import random

    from instill.eval.runner import evaluate
    from instill.eval.tasks import Task

    task = next((t for t in tasks if t.name == name), None)
    if task is None:
        raise InstillError(f"eval.during_training: suite '{name}' has no examples in this run")
    n = min(recipe.eval.during_training_sample, len(task.examples))
    pick = sorted(random.Random(recipe.train.seed).sample(range(len(task.examples)), n))
    sample = Task(
        task.name,
        [task.examples[i] for i in pick],
        task.metric,
        task.max_new_tokens,
        task.holdout,
    )

    def evaluator(model) -> float:
        return evaluate(model, tokenizer, sample, recipe.eval, "training").mean

    return evaluator


def check_replay_prompts(recipe: Recipe, tasks) -> None:
    """data.replay's prompts must not be prompts of a forgetting guard (general, drift suites)."""
    from instill.anchors import OPEN_FILE, check_replay_overlap, prompt_file, shipped_prompts

    cfg = recipe.data.replay
    guards = [(t.name, t.examples) for t in tasks if t.metric == "drift" or t.name == "general"]
    if cfg is None or not guards:
        return
    if cfg.prompts is None:
        check_replay_overlap(shipped_prompts("replay"), f"instill's replay prompts ({OPEN_FILE})",
                             guards)  # fmt: skip
    else:
        check_replay_overlap(prompt_file(cfg.prompts, "data.replay.prompts"), str(cfg.prompts),
                             guards)  # fmt: skip


def with_replay(recipe: Recipe, loaded, data, digest: str | None):
    """data.replay: the base model answers general prompts (cached) and its replies join the
    training rows at the set fraction."""
    from instill.anchors import base_replies, prompt_file, shipped_prompts
    from instill.data.dataset import add_replay, replay_conversations, replay_picks

    cfg = recipe.data.replay
    if cfg is None:
        return data
    prompts = (
        shipped_prompts("replay")
        if cfg.prompts is None
        else prompt_file(cfg.prompts, "data.replay.prompts")
    )
    picks = replay_picks(prompts, cfg.fraction, len(data.train), recipe.data.seed)
    unique = list({p.id: p for p in picks}.values())
    anchor = base_replies(
        loaded.model,
        loaded.tokenizer,
        unique,
        cfg.max_new_tokens,
        recipe.eval.batch_size,
        digest=digest,
        nll=False,  # replay trains on the replies; only a drift suite scores them
    )
    convs = replay_conversations(picks, anchor.replies)
    return add_replay(loaded.tokenizer, data, convs, recipe.data)


@dataclass
class Run:
    """What setup made ready, the same on every process."""

    recipe: Recipe
    acc: object  # the run's Accelerator
    run_dir: Path
    checkpoint: Path | None  # the checkpoint to resume from
    loaded: object  # models.LoadedModel: the base model, its tokenizer and source
    data: object  # data.dataset.Data: training and validation rows, stats, skipped rows
    tasks: list  # the evaluation suites (eval.tasks.Task)
    digest: str | None  # the base model's weights digest (drift suites and replay rows)
    fingerprint: dict  # what a checkpoint and this run must agree on
    start_pairs: list | None = None  # a preference run's held-out pairs scored by its start
    phases: Phases = field(default_factory=Phases)


def setup(acc, recipe: Recipe, overwrite: bool, phases: Phases | None = None) -> Run:
    """Check and make the run directory, load the model, build the data and suites, and check a
    checkpoint to resume from; a mistake found here leaves no half-made run directory behind."""
    phases = phases or Phases()
    # every process checks before the main one changes anything
    run_dir, checkpoint, clear = plan_run_dir(recipe, overwrite)
    if recipe.train.compile:  # no C++ compiler (or triton): say so before any work
        from instill.train.compiled import check_compiler

        check_compiler(acc.device)
    new = clear or not run_dir.exists() or not any(run_dir.iterdir())
    on_main(acc, lambda: make_run_dir(run_dir, clear))
    try:
        if acc.is_main_process:
            _write_yaml(RunDir(run_dir).config, recipe.model_dump(mode="json"))
        with acc.main_process_first():  # the main process fills the caches first
            with phases("load model (and convert)"):
                loaded = load_model(recipe.model, seed=recipe.train.seed)
            with phases("data and suites"):
                data = _build_data(recipe, loaded)
                tasks = build_tasks(recipe)
                check_replay_prompts(recipe, tasks)
            digest = None
            if recipe.data.replay is not None or any(t.metric == "drift" for t in tasks):
                from instill.models.load import model_digest

                name = "base replies (replay rows)" if recipe.data.replay else "base model digest"
                with phases(name):
                    digest = model_digest(loaded.model)
                    data = with_replay(recipe, loaded, data, digest)
        agreed = fingerprint(recipe, data, acc.num_processes)
        if checkpoint is not None:  # refuse a changed run before the base evaluation
            check_resumable(checkpoint, agreed)
    except BaseException:
        if new and acc.is_main_process:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    run = Run(recipe, acc, run_dir, checkpoint, loaded, data, tasks, digest, agreed, phases=phases)
    if acc.is_main_process:
        _describe(run)
    return run


def _build_data(recipe: Recipe, loaded):
    if recipe.train.objective == "sft":
        return build_data(
            loaded.tokenizer, recipe.data, holdout=frozenset(recipe.eval.holdout_clusters)
        )
    from instill.data.preference_data import build_preference_data

    return build_preference_data(loaded.tokenizer, recipe.data, recipe.train.objective)


def _describe(run: Run) -> None:
    """Say what the run is made of, and write data_stats.json (and skipped_rows.jsonl)."""
    recipe, loaded, data, run_dir = run.recipe, run.loaded, run.data, run.run_dir
    console.print(
        f"[bold]run[/bold] {run_dir}: model {recipe.model.name} ({loaded.source.kind}) on "
        f"{loaded.device}, {loaded.dtype}"
    )
    stats = data.stats
    write_text(
        RunDir(run_dir).data_stats, json.dumps(stats.as_dict(), indent=2) + "\n", "data stats"
    )
    if data.skipped:
        write_jsonl(RunDir(run_dir).skipped_rows, data.skipped)
        console.print(
            f"[yellow]skipped {len(data.skipped)} bad rows[/yellow] (data.on_error: skip); "
            f"each one and why: {RunDir(run_dir).skipped_rows}"
        )
    replay = f" ({stats.replay_rows} of them replay rows)" if stats.replay_rows else ""
    dropped = "; ".join(f"{why}: {n}" for why, n in stats.dropped.items())
    console.print(
        f"data: {stats.rows} training rows{replay}, {stats.tokens:,} tokens, "
        f"{stats.trained_tokens:,} trained, {stats.validation_rows} validation rows"
        + (f"; dropped ({dropped})" if dropped else "")
    )


def held_out_pairs(run: Run, model, side: str) -> list[dict] | None:
    """A preference run's held-out pairs (data.validation_pairs: a pair method's validation
    rows, or the pairs of kto's validation prompts when it trains from pairs) scored by `model`
    (main process): "start" before training (the starting model, also DPO's and KTO's
    reference), "model" after. The start's records are written to eval/base-preference.jsonl
    so a resumed run reuses them; after training the summary (before, after, change, length
    split) goes to eval/preference.json. None when the run has no pairs to score (supervised,
    or kto from labelled rows alone)."""
    from instill.eval.preference import (
        pair_records,
        preference_summary,
        read_preference,
        rows_sha256,
        score_pairs,
        side_records,
        write_preference,
    )

    recipe, folder, pairs = run.recipe, RunDir(run.run_dir).results, run.data.validation_pairs
    if not pairs:
        return None
    pad, split = run.loaded.tokenizer.pad_token_id, {"rows_sha256": rows_sha256(pairs)}
    if side == "start":
        base = folder / "base"
        found = read_preference(base) if run.checkpoint is not None else None
        if found and (found[0].get("split") or {}).get("rows_sha256") == split["rows_sha256"]:
            return side_records(found[1], "model")
        records = score_pairs(model, pad, pairs, recipe.eval.batch_size)
        write_preference(base, preference_summary(records), pair_records(records), split)
        return records
    start = run.start_pairs
    records = score_pairs(model, pad, pairs, recipe.eval.batch_size)
    reference = start if recipe.train.objective in ("dpo", "kto") else None
    summary = preference_summary(records, reference, start)
    held = "the run's validation split (data.validation: whole prompts held out)"
    if recipe.train.objective == "kto":
        held += ", scored as pairs (kto's validation loss takes their replies as labelled rows)"
    summary |= {
        "model": "the tuned model",
        "start": f"the starting model, {recipe.model.name}",
        "reference": f"the starting model, {recipe.model.name}" if reference else None,
        "pairs": held,
        "max_length": recipe.data.max_length,
    }
    write_preference(folder, summary, pair_records(records, reference, start), split)
    return records


def evaluate_before(run: Run) -> tuple[dict[str, SuiteResult], float | None]:
    """The untuned model's suites and validation loss (main process). Drift suites' anchors,
    the base model's replies, are taken here, before any adapter is attached. A resumed run
    reuses the results its first start wrote."""
    recipe, loaded, data, phases = run.recipe, run.loaded, run.data, run.phases
    base_val_loss = None
    supervised = recipe.train.objective == "sft"
    if data.validation and recipe.eval.before and run.checkpoint is None and supervised:
        with phases("base validation loss"):
            base_val_loss = _base_validation(run.run_dir, loaded, data, recipe)
    if recipe.eval.before and data.validation_pairs:
        with phases("held-out pairs: start"):
            run.start_pairs = held_out_pairs(run, loaded.model, "start")
    if any(t.metric == "drift" for t in run.tasks):
        with phases("base replies (drift suites)"):
            attach_anchors(loaded.model, loaded.tokenizer, run.tasks, recipe.eval, run.digest)
    before: dict[str, SuiteResult] = {}
    for task in run.tasks if recipe.eval.before else []:
        with phases(f"evaluate base: {task.name}"):
            before |= run_tasks(
                loaded.model,
                loaded.tokenizer,
                [task],
                recipe.eval,
                "base",
                RunDir(run.run_dir).results,
                prefix="base-",
                reuse=run.checkpoint is not None,
            )
    return before, base_val_loss


def _base_validation(run_dir: Path, loaded, data, recipe: Recipe) -> float:
    """The untuned model's validation loss, logged as step 0 so curves start where tuning did."""
    from instill.train.loop import validation_loss

    val = validation_loss(
        loaded.model, data.validation, recipe.train.batch_size, loaded.tokenizer.pad_token_id
    )
    Metrics(run_dir).append({"step": 0, "val_loss": round(val, 6), "tokens": 0, "elapsed_s": 0.0})
    return round(val, 6)


def _packing_efficiency(recipe: Recipe, data) -> float | None:
    # preference objectives pack each micro-batch's sequences, not the whole data: no figure
    if not recipe.data.packing or recipe.train.objective != "sft":
        return None
    from instill.data.packing import pack_best_fit, packing_efficiency

    bins = pack_best_fit(data.train, recipe.data.max_length)
    return round(packing_efficiency(data.train, bins, recipe.data.max_length), 4)


def _write_yaml(path: Path, data: dict) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False), "the run's config")


def run_recipe(recipe: Recipe, *, overwrite: bool = False) -> RunSummary:
    """Setup -> evaluate before -> train -> save -> evaluate after -> report. One process, or
    one of many under accelerate launch / torchrun: every process trains; only the main one
    writes files and evaluates."""
    phases = Phases()
    acc = make_accelerator(recipe)
    run = setup(acc, recipe, overwrite, phases)
    main, loaded, data, run_dir = acc.is_main_process, run.loaded, run.data, run.run_dir
    before, base_val_loss = on_main(acc, lambda: evaluate_before(run)) or ({}, None)
    with phases("train"):
        model, params = attach_adapter(loaded.model, recipe.adapter, recipe.train.seed)
        if main:
            console.print(str(params))
            if run.checkpoint is not None:
                console.print(f"resuming from {run.checkpoint}")
        result = train(
            model,
            loaded.tokenizer,
            data.train,
            recipe.train,
            run_dir,
            accelerator=acc,
            pack_length=recipe.data.max_length if recipe.data.packing else None,
            validation=data.validation,
            resume_from=run.checkpoint,
            fingerprint=run.fingerprint,
            evaluator=during_training(recipe, run.tasks, loaded.tokenizer),
        )

    def summary(before, after, main=main) -> RunSummary:
        return RunSummary(run_dir, result, before, after, phases.wall(), model, loaded.tokenizer,
                          main=main, phases=dict(phases.seconds))  # fmt: skip

    if result.interrupted:  # every process stopped after the same step
        if main:
            console.print(
                f"[yellow]interrupted[/yellow] after step {result.steps}; checkpoint written to "
                f"{RunDir(run_dir).checkpoints}; continue with train.resume=auto"
            )
        return summary(before, {})
    final = RunDir(run_dir).final
    with phases("save final model"):
        on_main(acc, lambda: save_model_dir(model, loaded.tokenizer, final, what="final model"))
    if not main:
        return summary({}, {}, main=False)
    after: dict[str, SuiteResult] = {}
    tuned = merged_for_evaluation(model) if recipe.eval.after and run.tasks else model
    for task in run.tasks if recipe.eval.after else []:
        with phases(f"evaluate tuned: {task.name}"):
            after |= run_tasks(tuned, loaded.tokenizer, [task], recipe.eval, "tuned",
                               RunDir(run_dir).results)  # fmt: skip
    del tuned
    if recipe.eval.after and run.start_pairs is not None:
        with phases("held-out pairs: tuned"):
            held_out_pairs(run, model, "model")
    done = summary(before, after)
    report(run, done, params, base_val_loss)
    return done


def report(run: Run, summary: RunSummary, params, base_val_loss: float | None) -> None:
    """run.json (what was run and what it measured), the run report and the model card in
    final/README.md. The report is timed too: run.json is written again with that phase, and
    `summary` gets the final wall time and phases."""
    from instill.report import write_run_report
    from instill.report.model_card import write_model_card
    from instill.report.summary import REPORT_PHASE

    recipe, loaded, data = run.recipe, run.loaded, run.data
    record = {
        "name": recipe.name,
        "model": {
            "name": recipe.model.name,
            "kind": loaded.source.kind,
            "path": loaded.source.path,
            "sha256": loaded.source.sha256,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
        },
        "params": {"trainable": params.trainable, "total": params.total},
        "objective": objective_record(recipe, loaded),
        "holdout_clusters": list(recipe.eval.holdout_clusters),
        "base_val_loss": base_val_loss,
        "packing_efficiency": _packing_efficiency(recipe, data),
        "train": summary.train.as_dict(),
        "data": data.stats.as_dict(),
        "eval_before": {k: v.summary() for k, v in summary.before.items()},
        "eval_after": {k: v.summary() for k, v in summary.after.items()},
        "wall_s": round(run.phases.wall(), 2),
        "phases": dict(run.phases.seconds),
    }
    path = RunDir(run.run_dir).record_file
    write_text(path, json.dumps(record, indent=2) + "\n", "the run record")
    with run.phases(REPORT_PHASE):
        write_run_report(run.run_dir, recipe.report.price_per_hour)
        write_model_card(run.run_dir)
    summary.wall_s, summary.phases = run.phases.wall(), dict(run.phases.seconds)
    record |= {"wall_s": round(summary.wall_s, 2), "phases": summary.phases}
    write_text(path, json.dumps(record, indent=2) + "\n", "the run record")


def objective_record(recipe: Recipe, loaded) -> dict:
    """What the run optimised, and against which reference, in words a report can print: peers
    differ on the reference (the base, or the supervised model the preference stage starts
    from), and their users file bugs over it."""
    t = recipe.train
    record: dict = {"name": t.objective}
    start = recipe.model.name
    if loaded.source.kind == "run":
        first = RunDir(start).recipe()
        record["started_from"] = {"run": start, "its_model": first.model.name,
                                  "its_objective": first.train.objective}  # fmt: skip
        start = f"run {start} (tuned from {first.model.name})"
    if t.objective == "sft":
        return record
    p = t.preference
    record["preference"] = {"beta": p.beta_for(t.objective), **p.model_dump(exclude={"beta"})}
    if t.objective in ("simpo", "orpo"):
        record["reference"] = "none: the method is reference-free"
    elif p.precompute_reference:
        record["reference"] = f"the starting model, {start}, scored once before training"
    elif recipe.adapter.method == "lora":
        record["reference"] = f"the starting model, {start} (the LoRA adapters switched off)"
    else:
        record["reference"] = f"the starting model, {start} (a frozen copy)"
    return record
