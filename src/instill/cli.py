"""The `instill` command. Each subcommand parses, builds, runs one stage, and reports.

User mistakes raise InstillError anywhere below; `main` prints them as one line (exit code 2).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.markup import escape

from instill.config import (
    BuiltinDataConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    Recipe,
    ReportConfig,
    SamplingConfig,
    ServeConfig,
    SuiteConfig,
    default,
    describe,
    load_recipe,
    recipe_help,
)
from instill.config.load import allowed_values, read_yaml
from instill.console import console, out
from instill.errors import InstillError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Instruction-tune a pretrained language model, measure what it bought, and use it.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at training data before training on it.")
app.add_typer(data_app, name="data")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments that answer a question.")
app.add_typer(experiment_app, name="experiment")
pairs_app = typer.Typer(no_args_is_help=True, help="Preference pairs for preference tuning.")
app.add_typer(pairs_app, name="pairs")

RECIPES = Path(__file__).parent / "recipes"
SHIPPED = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
OVERRIDES = typer.Argument(
    None, help="Dotted overrides such as train.lr=1e-4 adapter.r=8 (values in YAML)."
)
RECIPE = typer.Argument(..., help=f"Recipe YAML file, or the name of a shipped recipe: {SHIPPED}.")


def _version(show: bool) -> None:
    if show:
        from instill import __version__

        print(f"instill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print the version and exit."
    ),
) -> None:
    """Instruction-tune a pretrained language model, measure what it bought, and use it."""


def _quickstart_help() -> str:
    """quickstart --help: the values the quickstart runs with, read from its recipe."""
    recipe = Recipe.model_validate(read_yaml(RECIPES / "quickstart.yaml"))
    return recipe_help(
        recipe,
        "Recipe keys with the quickstart's values (src/instill/recipes/quickstart.yaml; "
        "change them as key=value overrides):",
    )


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # peft calls an API transformers 5 deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def recipe_path(name: str) -> Path:
    """A recipe file, or the name of a shipped recipe (quickstart, lora, full)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file() and not path.parent.name:
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise InstillError(f"{name}: recipe file not found (shipped recipes: {names})")


def _print_before_after(summary) -> None:
    from instill.eval.compare import compare, print_tables

    if summary.before and summary.after:
        sa, sb, tables = compare(str(summary.run_dir))
        print_tables(sa, sb, tables, out)
        print_forgetting(sa, sb, tables)
    else:
        for name, result in {**summary.before, **summary.after}.items():
            s = result.summary()
            out.print(
                f"{name} ({result.model}): {s['metric']} {100 * s['score']:.1f}% "
                f"(95% CI {100 * s['ci95'][0]:.1f}–{100 * s['ci95'][1]:.1f}, n={s['n']})"
            )
    t = summary.train
    out.print(
        f"training: {t.steps} steps, {t.wall_s:.0f} s, {t.tokens:,} tokens at "
        f"{t.tokens_per_s:.0f} tokens/s; loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f}"
    )
    out.print(f"total wall time: {summary.wall_s:.0f} s; run directory: {summary.run_dir}")
    _print_phases(summary)


def _print_phases(summary) -> None:
    from instill.report.summary import phase_lines

    out.print("time by phase (seconds, share of the wall time):", highlight=False)
    for line in phase_lines(summary.phases, summary.wall_s):
        out.print(line, highlight=False)


@app.command(epilog=f"Shipped recipes: {SHIPPED} (src/instill/recipes/).\n\n" + recipe_help())
def train(
    recipe: str = RECIPE,
    overrides: list[str] = OVERRIDES,
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """Tune a pretrained model as a recipe says; evaluate before and after; save to runs/<name>/."""
    from instill.recipe import run_recipe

    resolved = load_recipe(recipe_path(recipe), overrides or [])
    _quiet_libraries()
    summary = run_recipe(resolved, overwrite=overwrite)
    if summary.train.interrupted:
        if summary.main:
            _print_phases(summary)
        sys.exit(130)
    if not summary.main:
        return
    _print_before_after(summary)
    out.print(f"chat with it: instill chat {summary.run_dir / 'final'}")


@app.command(epilog=_quickstart_help())
def quickstart(
    overrides: list[str] = OVERRIDES,
    overwrite: bool = typer.Option(False, help="Replace an existing runs/quickstart."),
) -> None:
    """Evaluate SmolLM2-135M-Instruct on held-out built-in tasks, LoRA-tune it, evaluate again."""
    train(str(RECIPES / "quickstart.yaml"), overrides, overwrite)


CHAT_TEMPLATE = typer.Option(
    None,
    "--chat-template",
    help="Jinja chat template file replacing the model's own (needed when it has none); the "
    "same as a recipe's model.chat_template.",
)


def _model_spec(model: str, chat_template: Path | None):
    """The ModelConfig for loading MODEL with --chat-template; a missing file is an error before
    the slow model load."""
    from instill.data.render import load_chat_template

    if chat_template is not None:  # missing or empty: said now, naming the option
        load_chat_template(chat_template, "--chat-template")
    return ModelConfig(
        name=model, chat_template=str(chat_template) if chat_template is not None else None
    )


SUITES = typer.Option(
    ["builtin"],
    "--suite",
    help="builtin, general, general_gen, or a file of rows with references (repeat for "
    "several; a file is scored against the base model's replies with --metric drift).",
)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    suite: list[str] = SUITES,
    output: Path = typer.Option(
        None,
        help="Folder for results (default: a run's evals/<name>/, beside the run's own eval/; "
        "runs/eval for a model that is not a run).",
    ),
    name: str = typer.Option(
        None,
        help="A run: the name of this evaluation, written to <run>/evals/<name>/ (default: the "
        "suites and the options that differ from the run's, e.g. builtin or "
        "builtin.per_family-4).",
    ),
    replace_run_results: bool = typer.Option(
        False,
        "--replace-run-results",
        help="A run: write over the run's own tuned results in <run>/eval/ (what compare and "
        "report read), on the run's split only.",
    ),
    metric: str = typer.Option(
        default(SuiteConfig, "metric"),
        help="Primary metric of file suites: "
        f"{', '.join(allowed_values(SuiteConfig.model_fields['metric'].annotation))}. "
        + describe(SuiteConfig, "metric").removeprefix("Primary metric. "),
    ),
    holdout: list[str] = typer.Option(
        [],
        "--holdout",
        help="A cluster the model was not tuned on, reported as unseen (repeatable; default: "
        "none, or a run's own held-out clusters).",
    ),
    per_family: int = typer.Option(
        None,
        help="Built-in suite: held-out examples per family (default "
        f"{default(BuiltinDataConfig, 'eval_per_family')}; a run: its own split, as are --seed, "
        "--holdout and --max-new-tokens).",
    ),
    max_examples: int = typer.Option(
        None, help="File suites: at most N examples per cluster, picked by --seed (default: all)."
    ),
    seed: int = typer.Option(
        None,
        help="Seed of the built-in task generator and of --max-examples' pick (default "
        f"{default(BuiltinDataConfig, 'seed')}); answers are greedy, so it does not sample.",
    ),
    batch_size: int = typer.Option(
        default(EvalConfig, "batch_size"), help=describe(EvalConfig, "batch_size")
    ),
    max_new_tokens: int = typer.Option(
        None,
        help=f"Longest generated answer (default {default(EvalConfig, 'max_new_tokens')}; an "
        "export of a run: the run's).",
    ),
    general_gen_per_kind: int = typer.Option(
        None,
        help="general_gen: at most N prompts of each kind (default: a run's own, else all 136).",
    ),
    base: str = typer.Option(
        None,
        help="Drift suites (general_gen, --metric drift): the base model whose replies the model "
        "is scored against. Default: a run's own base model, else the model itself.",
    ),
    chat_template: Path = CHAT_TEMPLATE,
    engine: str = typer.Option(
        "torch",
        help="torch, or llama.cpp: a .gguf file (or a GGUF export folder) answered by "
        "llama.cpp as deployed (needs the llamacpp extra; generated-answer suites only).",
    ),
    lora: str = typer.Option(None, help="--engine llama.cpp: a LoRA adapter GGUF to apply."),
) -> None:
    """Score a model on evaluation suites; write per-example records and summaries with 95%
    confidence intervals to <output>/<suite>.jsonl and <suite>.json."""
    from pydantic import ValidationError

    from instill.eval.results import EVALUATIONS, RUN_RESULTS, run_of
    from instill.eval.suites import evaluation_folder_for, run_tasks, suite_file_task
    from instill.eval.tasks import builtin_task, check_metric, general_gen_task, general_task
    from instill.infer.llamacpp import choose_engine
    from instill.models import load_for_inference

    check_metric(metric, "--metric") if metric != "auto" else None
    model_spec = _model_spec(model, chat_template)
    families, deployed_output = None, None
    run_dir = None if engine == "llama.cpp" else run_of(model)
    changed: dict = {}  # the options that make this evaluation differ from the run's own
    if engine == "llama.cpp":
        from instill.eval.gguf import export_run_dir, run_split

        run_dir = export_run_dir(model)
        if run_dir is not None:  # the run's own split: the score pairs with the in-memory one
            split = run_split(run_dir)
            if per_family is None and seed is None and not holdout:
                per_family, seed, families = split.per_family, split.seed, split.families
                holdout = split.holdout
            max_new_tokens = max_new_tokens or split.max_new_tokens
            deployed_output = run_dir / "eval" / "deployed" / Path(model.rstrip("/")).name
    elif run_dir is not None:  # the run's own split, option by option, so results pair
        from instill.eval.gguf import run_split

        split = run_split(run_dir)
        own = {"per_family": split.per_family, "seed": split.seed,
               "holdout": ",".join(split.holdout), "max_new_tokens": split.max_new_tokens,
               "general_gen_per_kind": split.general_gen_per_kind}  # fmt: skip
        asked = {"per_family": per_family, "seed": seed, "holdout": ",".join(holdout) or None,
                 "max_new_tokens": max_new_tokens, "general_gen_per_kind": general_gen_per_kind,
                 "max_examples": max_examples, "base": base}  # fmt: skip
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
    tasks = []
    for each in suite:
        if each == "builtin":
            tasks.append(builtin_task(per_family, seed, families, holdout))
        elif each == "general":
            tasks.append(general_task())
        elif each == "general_gen":
            tasks.append(general_gen_task(general_gen_per_kind))
        else:
            try:
                spec = SuiteConfig(
                    name=Path(each).stem, path=each, metric=metric, max_examples=max_examples
                )
            except ValidationError as exc:
                raise InstillError(f"--suite {each}: {exc.errors()[0]['msg']}") from None
            task = suite_file_task(spec, seed)
            task.holdout = frozenset(holdout)
            tasks.append(task)
    _quiet_libraries()
    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    choose_engine(engine, lora)
    if engine == "llama.cpp":
        from instill.eval.gguf import run_llamacpp

        folder = output or deployed_output or Path("runs") / "eval"
        results = run_llamacpp(model, lora, tasks, cfg, folder, chat_template)
        for each, result in results.items():
            s = result.summary()
            out.print(
                f"{each}: {s['metric']} {100 * s['score']:.1f}% (95% CI {100 * s['ci95'][0]:.1f}"
                f"–{100 * s['ci95'][1]:.1f}, n={s['n']}); llama.cpp decoded "
                f"{s['decode_tokens_per_s']} tokens/s; written to {folder / each}.json"
            )
        return
    if engine == "llama.cpp" and (name is not None or replace_run_results):
        raise InstillError(
            "--name and --replace-run-results are for a run's own evaluation; --engine "
            "llama.cpp writes an export's score to <run>/eval/deployed/<export> (or --output)"
        )
    folder = evaluation_folder_for(
        model, run_dir, output, name, replace_run_results, tasks, changed
    )
    if any(t.metric == "drift" for t in tasks):
        from instill.eval.suites import attach_anchors

        base = base or run_base_model(model) or model
        anchor_model = load_for_inference(base, _model_spec(base, chat_template))
        out.print(f"drift suites are scored against the replies of {base}")
        attach_anchors(anchor_model.model, anchor_model.tokenizer, tasks, cfg)
        del anchor_model
    loaded = load_for_inference(model, model_spec)
    results = run_tasks(loaded.model, loaded.tokenizer, tasks, cfg, model, folder)
    for each, result in results.items():
        s = result.summary()
        if "generation" in s:  # scored against the base model's replies, in nats and tokens
            g = s["generation"]
            d, r = g["drift"], g["length_ratio"]
            out.print(
                f"{each}: drift {d['value']:+.3f} nats/token (95% CI {d['ci95'][0]:+.3f} to "
                f"{d['ci95'][1]:+.3f}); reply length x{r['value']:.2f} of the base's "
                f"({g['tokens']:.1f} vs {g['base_tokens']:.1f} tokens); under 10 words "
                f"{100 * g['short_share']:.1f}% vs {100 * g['base_short_share']:.1f}%; "
                f"n={s['n']}; written to {folder / each}.json"
            )
            continue
        out.print(
            f"{each}: {s['metric']} {100 * s['score']:.1f}% (95% CI {100 * s['ci95'][0]:.1f}–"
            f"{100 * s['ci95'][1]:.1f}, n={s['n']}); written to {folder / each}.json"
        )
    if run_dir is not None and folder != run_dir / RUN_RESULTS:
        out.print(
            f"the run's own results in {run_dir / RUN_RESULTS} are unchanged; compare with its "
            f"base: instill compare {run_dir} --eval {folder.name}"
            if folder.parent == run_dir / EVALUATIONS
            else f"the run's own results in {run_dir / RUN_RESULTS} are unchanged"
        )


def run_base_model(model: str) -> str | None:
    """The base model a run (or its final/ adapter) was tuned from, if `model` is one."""
    path = Path(model)
    for config in (path / "config.yaml", path.parent / "config.yaml"):
        if config.is_file() and (config.parent / "final").is_dir():
            import yaml

            recipe = yaml.safe_load(config.read_text()) or {}
            name = (recipe.get("model") or {}).get("name")
            if name and (recipe.get("model") or {}).get("init", "pretrained") == "pretrained":
                return name
    return None


@app.command("eval-pairs")
def eval_pairs(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    pairs: Path = typer.Option(
        ..., help="Held-out preference pairs (prompt/chosen/rejected or any pair format)."
    ),
    reference: str = typer.Option(
        None,
        help="Model for the implicit reward (log-ratio to it). Default: a run's starting model "
        "(its model.name), which is also scored as the 'before' side; else none.",
    ),
    max_length: int = typer.Option(
        default(DataConfig, "max_length"),
        min=1,
        help="Prompt plus reply, in tokens; longer replies are cut to fit.",
    ),
    batch_size: int = typer.Option(8, min=1, help="Pairs per forward (each is two rows)."),
    output: Path = typer.Option(
        None,
        help="Folder for preference.json and preference.jsonl (default: a run's "
        "evals/pairs-<file>/; runs/eval/pairs-<file>/ for a model that is not a run). The run "
        "report shows <run>/eval/preference.json.",
    ),
    chat_template: Path = CHAT_TEMPLATE,
) -> None:
    """Preference on held-out pairs: how often the model gives the chosen reply a higher
    (length-normalised, and summed) log-probability than the rejected one, and with a reference
    the implicit reward margin; 95% intervals resample prompts."""
    from instill.eval.preference import (
        evaluate_pairs,
        print_preference,
        run_start,
        write_preference,
    )
    from instill.eval.results import EVALUATIONS, run_of

    run_dir = run_of(model)
    ref_spec, is_start = None, False
    if reference is not None:
        ref_spec = _model_spec(reference, chat_template)
    elif run_dir is not None:
        ref_spec, is_start = run_start(run_dir), True
    if not pairs.is_file():
        raise InstillError(f"--pairs {pairs}: file not found")
    _quiet_libraries()
    summary, records, split = evaluate_pairs(
        _model_spec(model, chat_template), str(pairs), ref_spec,
        reference_is_start=is_start, max_length=max_length, batch_size=batch_size,
    )  # fmt: skip
    name = f"pairs-{pairs.stem}"
    folder = output or (run_dir / EVALUATIONS / name if run_dir else Path("runs") / "eval" / name)
    print_preference(summary, out)
    path = write_preference(folder, summary, records, split)
    out.print(f"written to {path} and {path.with_suffix('.jsonl')}", highlight=False)


@app.command()
def compare(
    a: str = typer.Argument(..., help="Results folder or run directory (the baseline)."),
    b: str = typer.Argument(None, help="Results folder or run directory (default: A's base)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    evaluation: str = typer.Option(
        None,
        "--eval",
        help="With one run: its tuned side from a later evaluation, <run>/evals/<name>/ "
        "(default: the run's own results in <run>/eval/).",
    ),
) -> None:
    """Per suite and cluster: A, B, the delta and its 95% interval (seen and unseen clusters
    apart). With one run directory: its base model against its tuned model."""
    from instill.eval.compare import as_json as to_json
    from instill.eval.compare import compare as run_compare
    from instill.eval.compare import print_tables
    from instill.eval.drift import guard_limits
    from instill.eval.preference import print_preference, read_preference
    from instill.report.run_report import forgetting_verdict

    # a preference run's held-out pairs, before and after (eval/preference.json)
    pairs = read_preference(Path(a) / "eval") if b is None and evaluation is None else None
    try:
        sa, sb, tables = run_compare(a, b, evaluation)
    except InstillError:
        if pairs is None:
            raise
        sa = None  # a preference run without suites: its pairs are the comparison
    if as_json:
        data = {}
        if sa is not None:
            verdict = forgetting_verdict(tables, sb.label)
            data = to_json(sa, sb, tables)
            data["forgetting"] = {
                "supported": verdict.supported,
                "text": verdict.text,
                "limits": guard_limits(),
            }
        if pairs is not None:
            data["preference"] = pairs[0]
        print(json.dumps(data, indent=2))
        return
    if sa is not None:
        print_tables(sa, sb, tables, out)
        print_forgetting(sa, sb, tables)
    if pairs is not None:
        print_preference(pairs[0], out)


def print_forgetting(sa, sb, tables: list[dict]) -> None:
    """The forgetting verdict and, when it found forgetting, the replies that moved most."""
    from instill.report.run_report import forgetting_verdict, moved_block

    verdict = forgetting_verdict(tables, sb.label)
    mark = {True: "supported", False: "not supported", None: "not measured"}[verdict.supported]
    out.print(f"[bold]No forgetting: {mark}[/bold]. {verdict.text}")
    for t in tables:
        moved = moved_block(t, sa.label, sb.label) if "generation" in t else None
        if moved is not None and verdict.supported is False:
            out.print(f"{t['suite']}: the replies that moved most")
            for row in moved.rows:
                out.print(f"  prompt: {row[0]}\n  {sa.label}: {row[1]}\n  {sb.label}: {row[2]}")


@app.command()
def report(
    run: Path = typer.Argument(..., help="A run directory (runs/<name>)."),
    price_per_hour: float = typer.Option(
        None,
        help="Price of a device-hour for the cost estimate, in the run's report.currency "
        f"(default USD) (default: the run's report.price_per_hour, else "
        f"{default(ReportConfig, 'price_per_hour')}).",
    ),
) -> None:
    """Write report.md and a self-contained report.html (with PNG plots) for a finished run."""
    import yaml

    from instill.report import write_run_report

    if not run.is_dir():
        raise InstillError(f"{run}: not a run directory")
    if price_per_hour is None:
        config = run / "config.yaml"
        recipe = yaml.safe_load(config.read_text()) if config.is_file() else {}
        price_per_hour = ((recipe or {}).get("report") or {}).get(
            "price_per_hour", default(ReportConfig, "price_per_hour")
        )
    md, page = write_run_report(run, price_per_hour)
    out.print(f"written {md} and {page}")


@experiment_app.command("transfer")
def experiment_transfer(
    recipe: str = RECIPE,
    overrides: list[str] = OVERRIDES,
    max_steps: int = typer.Option(
        None,
        help="Optimiser steps of every training, the budget (default: the recipe's "
        "train.max_steps, else its epochs).",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing experiment folder."),
    resume: bool = typer.Option(
        False, help="Continue an interrupted experiment: finished trainings are kept."
    ),
) -> None:
    """Run a recipe three ways (pretrained tuned, scratch tuned, pretrained untuned; both
    starts on the same rows and steps, so without replay) and write one report on what the
    pretrained start bought: answers, training time, generalisation, cost. A recipe with
    replay also runs as written, a fourth column. Results go to
    <train.output_dir>/<name>-transfer/."""
    from instill.experiment import transfer

    loaded = load_recipe(recipe_path(recipe), overrides or [])
    _quiet_libraries()
    page = transfer(loaded, max_steps=max_steps, overwrite=overwrite, resume=resume)
    if page is None:
        sys.exit(130)
    out.print(f"report: {page} (and report.md beside it)")


def _sampling_option(key: str):
    """An option of generate and chat that sets one of the engine's sampling settings."""
    flag = "--" + key.replace("_", "-")
    return typer.Option(default(SamplingConfig, key), flag, help=describe(SamplingConfig, key))


MAX_NEW_TOKENS = _sampling_option("max_new_tokens")
TEMPERATURE = _sampling_option("temperature")
TOP_K = _sampling_option("top_k")
TOP_P = _sampling_option("top_p")
REPETITION_PENALTY = _sampling_option("repetition_penalty")
SEED = _sampling_option("seed")
INT8 = typer.Option(
    False,
    "--int8",
    help="Decode with int8 weights (CPU, AVX-512): the Linear layers' weights a quarter of the "
    "bytes; replies often differ from the model as trained's within 32 tokens (README, "
    "Generation).",
)


def _sampling(**values) -> dict:
    """The sampling options, checked against SamplingConfig's limits before the model loads."""
    from pydantic import ValidationError

    try:
        return SamplingConfig(**values).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise InstillError(f"{option} {error['input']}: {error['msg']}") from None


@app.command()
def chat(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    system: str = typer.Option(None, help="System prompt (default: none)."),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: int = SEED,
    chat_template: Path = CHAT_TEMPLATE,
    int8: bool = INT8,
) -> None:
    """Chat in the terminal. With stdin from a pipe, each line is a user turn and each reply
    is printed on stdout.

    Commands: /reset clears the history. /system TEXT sets the system prompt and clears the
    history. /params shows the sampling settings; /params key=value ... changes them for the
    replies that follow (keys: max_new_tokens, temperature, top_k, top_p, repetition_penalty,
    seed; the same as the options), e.g. /params temperature=0.7 top_p=0.9 seed=1. /save FILE
    writes the conversation as JSON. /exit leaves."""
    from instill.chat import ChatSession
    from instill.infer.int8 import for_int8_decoding, require_int8_kernel
    from instill.models import load_for_inference

    params = _sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    spec = _model_spec(model, chat_template)
    _quiet_libraries()
    if int8:
        require_int8_kernel()  # before the slow load
    loaded = load_for_inference(model, spec)
    if int8:
        for_int8_decoding(loaded.model)
    session = ChatSession(loaded.model, loaded.tokenizer, system=system, **params)
    session.run(sys.stdin, interactive=sys.stdin.isatty())


@app.command()
def generate(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    input: Path = typer.Option(..., help="JSONL: rows with 'messages' or 'prompt'."),
    output: Path = typer.Option(..., help="JSONL written row by row; rerun to resume."),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: int = SEED,
    batch_size: int = typer.Option(8, help="Rows generated together."),
    chat_template: Path = CHAT_TEMPLATE,
    int8: bool = INT8,
) -> None:
    """Batch generation: one output row per input row, in order; rows already in --output are
    skipped, so an interrupted job continues where it stopped."""
    from instill.infer import GenParams
    from instill.infer.batch import generate_file
    from instill.infer.int8 import for_int8_decoding, require_int8_kernel
    from instill.models import load_for_inference

    _quiet_libraries()
    params = GenParams(**_sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    ))  # fmt: skip
    if not input.is_file():  # before the slow model load
        raise InstillError(f"{input}: input file not found (--input)")
    if int8:
        require_int8_kernel()
    loaded = load_for_inference(model, _model_spec(model, chat_template))
    if int8:
        for_int8_decoding(loaded.model)
    made, skipped = generate_file(
        loaded.model, loaded.tokenizer, input, output, params, batch_size=batch_size
    )
    out.print(f"{output}: {made} rows generated, {skipped} already there")


@app.command()
def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    host: str = typer.Option(default(ServeConfig, "host"), help=describe(ServeConfig, "host")),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: str = typer.Option(
        None,
        envvar="INSTILL_API_KEY",
        help="Required bearer key. Prefer env INSTILL_API_KEY or --api-key-file: a value on "
        "the command line is visible to other users in ps.",
    ),
    api_key_file: Path = typer.Option(None, help="File holding the bearer key (first line)."),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        help="Another name clients reach the server by (the Host header; repeatable). Default: "
        "the --host address, and localhost names when it is loopback. '*' answers any name "
        "(turns off the DNS-rebinding check).",
    ),
    chat_template: Path = CHAT_TEMPLATE,
    max_batch: int = typer.Option(
        default(ServeConfig, "max_batch"), help=describe(ServeConfig, "max_batch")
    ),
    max_concurrent: int = typer.Option(
        default(ServeConfig, "max_concurrent"), help=describe(ServeConfig, "max_concurrent")
    ),
    max_tokens_cap: int = typer.Option(
        default(ServeConfig, "max_tokens_cap"), help=describe(ServeConfig, "max_tokens_cap")
    ),
    engine: str = typer.Option(
        "torch",
        help="torch, or llama.cpp: a .gguf file (or a GGUF export folder) decoded by llama.cpp "
        "in-process, one request at a time (needs the llamacpp extra).",
    ),
    lora: str = typer.Option(None, help="--engine llama.cpp: a LoRA adapter GGUF to apply."),
    int8: bool = typer.Option(default(ServeConfig, "int8"), help=describe(ServeConfig, "int8")),
) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health)
    with a web chat page at /. A model without a chat template (and no --chat-template) serves
    raw prompts on /v1/completions; its chat routes answer 400."""
    from pydantic import ValidationError

    from instill.infer.llamacpp import choose_engine
    from instill.serve import read_api_key, run_server

    choose_engine(engine, lora, int8=int8)

    if api_key_file is not None:
        if api_key is not None:
            raise InstillError(
                "--api-key (or INSTILL_API_KEY) and --api-key-file are both set; give one of them"
            )
        api_key = read_api_key(api_key_file)
    elif getattr(ctx.get_parameter_source("api_key"), "name", "") == "COMMANDLINE":
        console.print(
            "note: --api-key on the command line is visible to other users (ps); set "
            "INSTILL_API_KEY or use --api-key-file instead",
            soft_wrap=True,
        )
    spec = _model_spec(model, chat_template)
    if engine == "llama.cpp":
        from instill.infer import llamacpp

        llamacpp.target(model, lora)  # a wrong file or a missing extra is said before loading
        llamacpp.require("--engine llama.cpp")
    if api_key is None and os.environ.get("INSTILL_API_KEY") == "":  # click reads "" as unset
        raise InstillError(
            "INSTILL_API_KEY is set but empty, which would turn authentication off; set a key, "
            "or unset INSTILL_API_KEY to serve without one"
        )
    try:
        cfg = ServeConfig(
            api_key=api_key,
            max_batch=max_batch,
            max_concurrent=max_concurrent,
            max_tokens_cap=max_tokens_cap,
            host=host,
            allowed_hosts=tuple(allowed_host),
            int8=int8,
        )
    except ValidationError as exc:  # before the model loads
        error = exc.errors()[0]
        field = str(error["loc"][0])
        source = getattr(ctx.get_parameter_source(field), "name", "")
        option = "INSTILL_API_KEY" if source == "ENVIRONMENT" else "--" + field.replace("_", "-")
        if error["type"] == "greater_than_equal":
            message = f"must be at least {error['ctx']['ge']}"
        else:
            message = error["msg"].removeprefix("Value error, ")
        shown = "" if field == "api_key" else f" {error['input']}"  # never echo a key
        raise InstillError(f"{option}{shown}: {message}") from None
    _quiet_libraries()
    run_server(
        model, cfg, port=port, spec=spec, lora=lora, engine=engine, chat_template=chat_template
    )


def _pairs_option(key: str, flag: str | None = None):
    """An option of `pairs make` that sets one PairsConfig field."""
    flag = flag or "--" + key.replace("_", "-")
    return typer.Option(default(PairsConfig, key), flag, help=describe(PairsConfig, key))


@pairs_app.command("make")
def pairs_make(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    out_file: Path = typer.Option(
        ...,
        "--out",
        help="Pairs JSONL to write (format pairs); a summary goes to OUT.summary.json.",
    ),
    k: int = _pairs_option("k"),
    temperature: float = _pairs_option("temperature"),
    per_family: int = _pairs_option("per_family"),
    seed: int = _pairs_option("seed"),
    max_new_tokens: int = _pairs_option("max_new_tokens"),
    threshold: float = _pairs_option("threshold"),
    batch_size: int = _pairs_option("batch_size"),
    pairs_per_prompt: int = _pairs_option("pairs_per_prompt"),
    suite: str = typer.Option(
        "builtin",
        help="builtin (the built-in families' training split), or a file of rows with "
        "reference answers (as `instill eval --suite FILE` reads).",
    ),
    metric: str = typer.Option(
        "auto",
        help="A suite file's scorer: exact_match (auto), contains, token_f1 or rouge_l.",
    ),
    holdout: list[str] = typer.Option(
        [],
        "--holdout",
        help="A cluster whose prompts are never sampled (repeatable). A run's own "
        "eval.holdout_clusters are always left out too.",
    ),
    kto: Path = typer.Option(
        None, help="Also write every distinct reply as a prompt/completion/label row (KTO)."
    ),
    family: list[str] = typer.Option(
        [],
        "--family",
        help="Built-in tasks: sample only this family (repeatable; default: every family), "
        "e.g. those whose pass rate leaves room. Other families' prompts are unchanged by it.",
    ),
    chat_template: Path = CHAT_TEMPLATE,
) -> None:
    """Self-checked preference pairs: the model samples k replies to each training prompt of
    tasks whose answers can be checked, the task's own scorer splits them into passing and
    failing, and each prompt with both gives a pair (the shortest passing reply chosen, a
    failing one drawn by seed rejected). Held-out prompts (the eval split, held-out clusters)
    are never used."""
    from pydantic import ValidationError

    from instill.pairs import make_pairs, summary_path, summary_table

    try:
        opts = PairsConfig(
            k=k, temperature=temperature, per_family=per_family, seed=seed,
            max_new_tokens=max_new_tokens, threshold=threshold, batch_size=batch_size,
            pairs_per_prompt=pairs_per_prompt,
        )  # fmt: skip
    except ValidationError as exc:
        error = exc.errors()[0]
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise InstillError(f"{option} {error['input']}: {error['msg']}") from None
    spec = _model_spec(model, chat_template)
    _quiet_libraries()
    summary = make_pairs(
        model, out_file, opts, suite=suite, metric=metric, holdout=holdout, kto=kto, spec=spec,
        families=family,
    )  # fmt: skip
    out.print(summary_table(summary))
    if summary["pairs_written"] == 0:
        out.print(
            "no prompt gave both a passing and a failing reply: raise --k or --temperature "
            "(all failing), or use harder prompts (all passing)",
            soft_wrap=True,
        )
    kept = f"; {summary['kto_rows']} labelled rows to {kto}" if kto is not None else ""
    out.print(
        f"{summary['pairs_written']} pairs from {summary['prompts']} prompts written to "
        f"{out_file}{kept}; summary {summary_path(out_file)} ({summary['wall_s']:.0f} s)",
        soft_wrap=True,
    )


@data_app.command("inspect")
def data_inspect(
    source: str = typer.Argument(..., help="A recipe (its data section) or a data file."),
    model: str = typer.Option(default(ModelConfig, "name"), help="Tokenizer and template to use."),
    rows: int = typer.Option(2, help="How many rows to show rendered."),
    max_length: int = typer.Option(
        default(DataConfig, "max_length"),
        help="A data file: longest tokenised row, in tokens (a recipe: its data.max_length).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Detected format, counts, length histogram, and rows coloured by what is trained."""
    from instill.data.inspect_data import inspect_data

    _quiet_libraries()
    report = inspect_data(
        source, model=model, show_rows=0 if as_json else rows, max_length=max_length
    )
    if as_json:
        print(json.dumps(report, indent=2))


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory (with final/)."),
    fmt: str = typer.Option(
        "hf",
        "--format",
        help="hf, gguf (merged) or gguf-lora (a llama.cpp adapter for the run's base GGUF).",
    ),
    quant: str = typer.Option(
        None,
        help="GGUF type: f32, f16, q8_0, q4_0, q4_1, or auto (per-tensor types chosen by "
        "measurement; default: the GGUF base's own); or, quantised by llama.cpp's own quantizer "
        "(the llamacpp extra), q6_k, q5_k_m, q5_k_s, q5_0, q5_1, q4_k_m, q4_k_s, iq4_xs, iq4_nl, "
        "q3_k_l, q3_k_m, q3_k_s, q2_k, without an importance matrix (llama-cpp-python cannot "
        "make one). gguf-lora: f32, f16 (default), q8_0.",
    ),
    max_size: float = typer.Option(
        None, help="--quant auto: the file's size budget in MB (default: 5.5 bits a weight)."
    ),
    dtype: str = typer.Option("fp32", help="HF weights dtype: fp32, fp16, bf16."),
    parts: str = typer.Option("merged", help="HF: merged, adapter or both."),
    output: Path = typer.Option(None, help="Output directory (default RUN/export/FORMAT-TYPE)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    dequantize: bool = typer.Option(
        False, help="Merge an adapter trained on a 4-bit base into the full-precision base."
    ),
    min_agreement: float = typer.Option(
        None,
        help="Replace the verification's greedy-agreement floor, a share from 0 to 1 (lower "
        "accepts more drift; default: the export type's own floor, printed with the check).",
    ),
    copy_base: bool = typer.Option(
        False,
        help="gguf-lora: put the base GGUF into the export folder (hardlinked on the same "
        "filesystem, else copied; sha256 checked), so the folder is self-contained and movable.",
    ),
) -> None:
    """Export a tuned model (HF directory, GGUF, or a llama.cpp LoRA adapter GGUF), verified by
    reloading (GGUF: by llama.cpp when the llamacpp extra is installed), with instill.json; GGUF
    exports also get an Ollama Modelfile and llama-server.sh."""
    from instill.export import export_run

    _quiet_libraries()
    export_run(
        run,
        fmt=fmt,
        quant=quant,
        dtype=dtype,
        parts=parts,
        output=output,
        overwrite=overwrite,
        dequantize=dequantize,
        min_agreement=min_agreement,
        max_size_mb=max_size,
        copy_base=copy_base,
    )


def main() -> None:
    try:
        app(standalone_mode=False)
    except InstillError as exc:
        console.print("[red]error:[/red]", escape(str(exc)), soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # click's usage errors arrive here in non-standalone mode
        import click

        # typer may ship its own copy of click, whose exceptions are not click's: both kinds
        # carry show() and exit_code
        code = getattr(exc, "exit_code", None)
        if isinstance(exc, click.exceptions.ClickException) or (
            callable(getattr(exc, "show", None)) and isinstance(code, int)
        ):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort | typer.Abort):
            sys.exit(1)
        raise
