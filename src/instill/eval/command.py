"""`instill eval MODEL`: what to evaluate, on which split, with which engine, and where to
write it; the CLI parses the options (config.commands.EvalOptions) and calls these.

    plan(model, opts)   the split: the run's own (RunDir.split) option by option, else
                        config/'s defaults -> the tasks (suites.named_task, or a suite file)
                        -> the engine (torch, or llama.cpp for a GGUF) -> the results folder
    run(plan)           the base model's replies for drift suites -> the model -> the suites
                        -> <folder>/<suite>.json(l); one line per suite, printed as it ends
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from instill.config import BuiltinDataConfig, EvalConfig, SuiteConfig, default
from instill.config.commands import EvalOptions
from instill.console import out
from instill.errors import InstillError
from instill.eval.results import EVALUATIONS, RUN_RESULTS, run_of
from instill.eval.runner import SuiteResult
from instill.eval.suites import evaluation_folder_for, named_task, suite_file_task
from instill.eval.tasks import Task, check_metric
from instill.rundir import RunDir, RunSplit


@dataclass
class Plan:
    model: str
    tasks: list[Task]
    cfg: EvalConfig
    opts: EvalOptions
    run_dir: Path | None  # the run evaluated (or the run an export was made from)
    folder: Path  # where the results go
    changed: dict = field(default_factory=dict)  # the options that differ from the run's own


def _split(model: str, o: EvalOptions) -> tuple[RunSplit, Path | None, Path | None, dict]:
    """The split asked for, the run's own where not asked: (split, run, deployed folder, the
    options that differ from the run's)."""
    per_family, seed, holdout, max_new_tokens = o.per_family, o.seed, o.holdout, o.max_new_tokens
    general_gen_per_kind, families = o.general_gen_per_kind, None
    deployed, changed = None, {}
    if o.engine == "llama.cpp":
        from instill.eval.gguf import export_run_dir, run_split

        run_dir = export_run_dir(model)
        if run_dir is not None:  # the run's own split: the score pairs with the in-memory one
            split = run_split(run_dir)
            if per_family is None and seed is None and not holdout:
                per_family, seed, families = split.per_family, split.seed, split.families
                holdout = split.holdout
            max_new_tokens = max_new_tokens or split.max_new_tokens
            deployed = RunDir(run_dir).deployed_score(model)
    else:
        run_dir = run_of(model)
    if run_dir is not None and o.engine != "llama.cpp":  # option by option, so results pair
        split = RunDir(run_dir).split()
        own = {"per_family": split.per_family, "seed": split.seed,
               "holdout": ",".join(split.holdout), "max_new_tokens": split.max_new_tokens,
               "general_gen_per_kind": split.general_gen_per_kind}  # fmt: skip
        asked = {"per_family": per_family, "seed": seed, "holdout": ",".join(holdout) or None,
                 "max_new_tokens": max_new_tokens, "general_gen_per_kind": general_gen_per_kind,
                 "max_examples": o.max_examples, "base": o.base}  # fmt: skip
        changed = {k: v for k, v in asked.items() if v is not None and v != own.get(k)}
        families = split.families
        per_family = split.per_family if per_family is None else per_family
        seed = split.seed if seed is None else seed
        holdout = holdout or split.holdout
        max_new_tokens = split.max_new_tokens if max_new_tokens is None else max_new_tokens
        if general_gen_per_kind is None:
            general_gen_per_kind = split.general_gen_per_kind
    if per_family is None:
        per_family = default(BuiltinDataConfig, "eval_per_family")
    if seed is None:
        seed = default(BuiltinDataConfig, "seed")
    if max_new_tokens is None:
        max_new_tokens = default(EvalConfig, "max_new_tokens")
    split = RunSplit(per_family, seed, families, list(holdout), max_new_tokens,
                     general_gen_per_kind)  # fmt: skip
    return split, run_dir, deployed, changed


def _tasks(o: EvalOptions, split: RunSplit) -> list[Task]:
    from pydantic import ValidationError

    tasks = []
    for each in o.suite:
        task = named_task(each, split)
        if task is None:  # a file of the user's
            try:
                spec = SuiteConfig(
                    name=Path(each).stem, path=each, metric=o.metric, max_examples=o.max_examples
                )
            except ValidationError as exc:
                raise InstillError(f"--suite {each}: {exc.errors()[0]['msg']}") from None
            task = suite_file_task(spec, split.seed)
            task.holdout = frozenset(split.holdout)
        tasks.append(task)
    return tasks


def plan(model: str, o: EvalOptions) -> Plan:
    """Every check and choice before a model loads."""
    from instill.models import model_spec

    check_metric(o.metric, "--metric") if o.metric != "auto" else None
    model_spec(model, o.chat_template)  # a missing template file is said now
    split, run_dir, deployed, changed = _split(model, o)
    tasks = _tasks(o, split)
    cfg = EvalConfig(batch_size=o.batch_size, max_new_tokens=split.max_new_tokens)
    from instill.infer import llamacpp

    llamacpp.choose_engine(o.engine, o.lora)  # the one engine choice, serve's too
    if o.engine == "llama.cpp":
        folder = o.output or deployed or Path("runs") / RUN_RESULTS
    else:
        folder = evaluation_folder_for(
            model, run_dir, o.output, o.name, o.replace_run_results, tasks, changed
        )
    return Plan(model, tasks, cfg, o, run_dir, folder, changed)


def run(p: Plan) -> dict[str, SuiteResult]:
    """Evaluate and write every suite of the plan, printing one line for each."""
    if p.opts.engine == "llama.cpp":
        from instill.eval.gguf import run_llamacpp

        results = run_llamacpp(p.model, p.opts.lora, p.tasks, p.cfg, p.folder, p.opts.chat_template)
    else:
        results = _run_torch(p)
    for name, result in results.items():
        out.print(result_line(name, result.summary(), p.folder, p.opts.engine))
    note = closing_note(p)
    if note:
        out.print(note)
    return results


def _run_torch(p: Plan) -> dict[str, SuiteResult]:
    from instill.eval.suites import attach_anchors, run_tasks
    from instill.models import load_for_inference, model_spec

    if any(t.metric == "drift" for t in p.tasks):
        base = p.opts.base or run_base_model(p.model) or p.model
        anchor_model = load_for_inference(base, model_spec(base, p.opts.chat_template))
        out.print(f"drift suites are scored against the replies of {base}")
        attach_anchors(anchor_model.model, anchor_model.tokenizer, p.tasks, p.cfg)
        del anchor_model
    loaded = load_for_inference(p.model, model_spec(p.model, p.opts.chat_template))
    return run_tasks(loaded.model, loaded.tokenizer, p.tasks, p.cfg, p.model, p.folder)


def run_base_model(model: str) -> str | None:
    """The base model a run (or its final/ adapter) was tuned from, if `model` is one."""
    run = RunDir.given_as_model(model)
    if run is None:
        return None
    recipe = run.recipe()
    return recipe.model.name if recipe.model.init == "pretrained" else None


def result_line(name: str, s: dict, folder: Path, engine: str = "torch") -> str:
    """One suite's score, as the command prints it."""
    if engine == "llama.cpp":
        return (
            f"{name}: {s['metric']} {100 * s['score']:.1f}% (95% CI {100 * s['ci95'][0]:.1f}"
            f"–{100 * s['ci95'][1]:.1f}, n={s['n']}); llama.cpp decoded "
            f"{s['decode_tokens_per_s']} tokens/s; written to {folder / name}.json"
        )
    if "generation" in s:  # scored against the base model's replies, in nats and tokens
        g = s["generation"]
        d, r = g["drift"], g["length_ratio"]
        return (
            f"{name}: drift {d['value']:+.3f} nats/token (95% CI {d['ci95'][0]:+.3f} to "
            f"{d['ci95'][1]:+.3f}); reply length x{r['value']:.2f} of the base's "
            f"({g['tokens']:.1f} vs {g['base_tokens']:.1f} tokens); under 10 words "
            f"{100 * g['short_share']:.1f}% vs {100 * g['base_short_share']:.1f}%; "
            f"n={s['n']}; written to {folder / name}.json"
        )
    return (
        f"{name}: {s['metric']} {100 * s['score']:.1f}% (95% CI {100 * s['ci95'][0]:.1f}–"
        f"{100 * s['ci95'][1]:.1f}, n={s['n']}); written to {folder / name}.json"
    )


def closing_note(p: Plan) -> str | None:
    """Where a run's own results are, when this evaluation did not replace them."""
    if p.opts.engine == "llama.cpp" or p.run_dir is None:
        return None
    own = p.run_dir / RUN_RESULTS
    if p.folder == own:
        return None
    if p.folder.parent == p.run_dir / EVALUATIONS:
        return (
            f"the run's own results in {own} are unchanged; compare with its base: instill "
            f"compare {p.run_dir} --eval {p.folder.name}"
        )
    return f"the run's own results in {own} are unchanged"
