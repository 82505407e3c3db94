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
from pydantic import BaseModel
from rich.markup import escape

from instill.config import (
    PairsConfig,
    Recipe,
    SamplingConfig,
    ServeConfig,
    commands,
    describe,
    load_recipe,
    recipe_help,
)
from instill.config.commands import (
    EvalOptions,
    EvalPairsOptions,
    ExportOptions,
    InspectOptions,
    PairsSourceOptions,
    ServeOptions,
)
from instill.config.load import read_yaml
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


def option(section: type[BaseModel], key: str, *flags: str, **extra):
    """The typer option that sets `section.key`: its default and --help are the field's, so a
    default is written once, in config/ (required fields stay required)."""
    field = section.model_fields[key]
    value = ... if field.is_required() else commands.option_default(section, key)
    return typer.Option(value, *flags, help=describe(section, key), **extra)


MODEL = typer.Argument(..., help=commands.MODEL)
CHAT_TEMPLATE = option(EvalOptions, "chat_template", "--chat-template")


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
        f"{t.tokens_per_s:.0f} tokens/s"
        + (f" ({t.autocast} autocast)" if getattr(t, "autocast", None) else "")
        + f"; loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f}"
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
    overwrite: bool = option(commands.TrainOptions, "overwrite"),
) -> None:
    """Tune a pretrained model as a recipe says; evaluate before and after; save to runs/<name>/."""
    from instill.recipe import run_recipe
    from instill.rundir import RunDir

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
    out.print(f"chat with it: instill chat {RunDir(summary.run_dir).final}")


@app.command(epilog=_quickstart_help())
def quickstart(
    overrides: list[str] = OVERRIDES,
    overwrite: bool = option(commands.QuickstartOptions, "overwrite"),
) -> None:
    """Evaluate SmolLM2-135M-Instruct on held-out built-in tasks, LoRA-tune it, evaluate again."""
    train(str(RECIPES / "quickstart.yaml"), overrides, overwrite)


def _model_spec(model: str, chat_template: Path | None):
    from instill.models import model_spec

    return model_spec(model, chat_template)


def _eval_option(key: str, *flags: str):
    return option(EvalOptions, key, *flags)


@app.command("eval")
def eval_cmd(
    model: str = MODEL,
    suite: list[str] = _eval_option("suite", "--suite"),
    output: Path = _eval_option("output"),
    name: str = _eval_option("name"),
    replace_run_results: bool = _eval_option("replace_run_results", "--replace-run-results"),
    metric: str = _eval_option("metric"),
    holdout: list[str] = _eval_option("holdout", "--holdout"),
    per_family: int = _eval_option("per_family"),
    max_examples: int = _eval_option("max_examples"),
    seed: int = _eval_option("seed"),
    batch_size: int = _eval_option("batch_size"),
    max_new_tokens: int = _eval_option("max_new_tokens"),
    general_gen_per_kind: int = _eval_option("general_gen_per_kind"),
    base: str = _eval_option("base"),
    chat_template: Path = CHAT_TEMPLATE,
    engine: str = _eval_option("engine"),
    lora: str = _eval_option("lora"),
) -> None:
    """Score a model on evaluation suites; write per-example records and summaries with 95%
    confidence intervals to <output>/<suite>.jsonl and <suite>.json."""
    from instill.eval import command

    opts = EvalOptions(
        suite=suite, output=output, name=name, replace_run_results=replace_run_results,
        metric=metric, holdout=holdout, per_family=per_family, max_examples=max_examples,
        seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
        general_gen_per_kind=general_gen_per_kind, base=base, chat_template=chat_template,
        engine=engine, lora=lora,
    )  # fmt: skip
    plan = command.plan(model, opts)
    _quiet_libraries()
    command.run(plan)


@app.command("eval-pairs")
def eval_pairs(
    model: str = MODEL,
    pairs: Path = option(EvalPairsOptions, "pairs"),
    reference: str = option(EvalPairsOptions, "reference"),
    max_length: int = option(EvalPairsOptions, "max_length", min=1),
    batch_size: int = option(EvalPairsOptions, "batch_size", min=1),
    output: Path = option(EvalPairsOptions, "output"),
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
    from instill.eval.results import EVALUATIONS, RUN_RESULTS, run_of

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
    outside = Path("runs") / RUN_RESULTS / name  # a model that is not a run
    folder = output or (run_dir / EVALUATIONS / name if run_dir else outside)
    print_preference(summary, out)
    path = write_preference(folder, summary, records, split)
    out.print(f"written to {path} and {path.with_suffix('.jsonl')}", highlight=False)


@app.command()
def compare(
    a: str = typer.Argument(..., help="Results folder or run directory (the baseline)."),
    b: str = typer.Argument(None, help="Results folder or run directory (default: A's base)."),
    as_json: bool = option(commands.CompareOptions, "as_json", "--json"),
    evaluation: str = option(commands.CompareOptions, "evaluation", "--eval"),
) -> None:
    """Per suite and cluster: A, B, the delta and its 95% interval (seen and unseen clusters
    apart). With one run directory: its base model against its tuned model. Held-out pairs
    (preference.json, from a preference run or `instill eval-pairs`) on both sides: A's model
    before, B's after, paired pair by pair, implicit reward against B's reference."""
    from instill.eval.compare import as_json as to_json
    from instill.eval.compare import compare as run_compare
    from instill.eval.compare import print_tables
    from instill.eval.drift import guard_limits
    from instill.eval.preference import (
        pair_preference,
        preference_folder,
        print_preference,
        read_preference,
    )
    from instill.report.document import mark
    from instill.report.run_report import forgetting_verdict
    from instill.rundir import RunDir

    # held-out pairs, before and after: a preference run's own (eval/preference.json), or two
    # results of `instill eval-pairs` (or runs) on the same pairs, paired pair by pair
    pairs, lone, unpaired = None, None, None
    if b is None and evaluation is None:
        pairs = read_preference(RunDir(a).results)
    elif evaluation is None:
        fa, fb = preference_folder(a), preference_folder(b)
        if fa is not None and fb is not None:
            try:
                pairs = (pair_preference(fa, fb),)
            except InstillError as e:  # other pairs: the suites may still compare
                unpaired = e
        elif fa is not None or fb is not None:  # one side's pairs, nothing to pair them with
            lone, other = (a, b) if fa is not None else (b, a)
    try:
        sa, sb, tables = run_compare(a, b, evaluation)
    except InstillError:
        if lone is not None:
            raise InstillError(
                f"{lone} holds held-out pair results (preference.json) but {other} holds none, "
                "and the two share no suite results; score its model on the same pairs first: "
                f"instill eval-pairs MODEL --pairs FILE --output {other}"
            ) from None
        if unpaired is not None:
            raise unpaired from None
        if pairs is None:
            raise
        sa = None  # a preference run without suites: its pairs are the comparison
    if as_json:
        data = {}
        if sa is not None:
            verdict = forgetting_verdict(tables, sb.label)
            data = to_json(sa, sb, tables)
            data["forgetting"] = {
                "verdict": mark(verdict),  # supported, not supported, not settled, not measured
                "supported": verdict.supported,
                "text": verdict.text,
                "limits": guard_limits(),
            }
        if pairs is not None:
            data["preference"] = pairs[0]
        if unpaired is not None:
            data["preference_not_compared"] = str(unpaired)
        print(json.dumps(data, indent=2))
        return
    if sa is not None:
        print_tables(sa, sb, tables, out)
        print_forgetting(sa, sb, tables)
    if pairs is not None:
        print_preference(pairs[0], out)
    if unpaired is not None:
        out.print(f"held-out pairs not compared: {unpaired}", highlight=False)


def print_forgetting(sa, sb, tables: list[dict]) -> None:
    """The forgetting verdict and, when it found forgetting or could not settle it, the replies
    that moved most."""
    from instill.report.document import mark
    from instill.report.run_report import forgetting_verdict, moved_block

    verdict = forgetting_verdict(tables, sb.label)
    out.print(f"[bold]No forgetting: {mark(verdict)}[/bold]. {verdict.text}")
    for t in tables:
        moved = moved_block(t, sa.label, sb.label) if "generation" in t else None
        if moved is not None and (verdict.supported is False or not verdict.settled):
            out.print(f"{t['suite']}: the replies that moved most")
            for row in moved.rows:
                out.print(f"  prompt: {row[0]}\n  {sa.label}: {row[1]}\n  {sb.label}: {row[2]}")


@app.command()
def report(
    run: Path = typer.Argument(..., help="A run directory (runs/<name>)."),
    price_per_hour: float = option(commands.ReportOptions, "price_per_hour"),
) -> None:
    """Write report.md and a self-contained report.html (with PNG plots) for a finished run."""
    from instill.report import write_run_report
    from instill.rundir import RunDir

    if not run.is_dir():
        raise InstillError(f"{run}: not a run directory")
    if price_per_hour is None:
        try:  # the schema's default when the run has no config.yaml
            price_per_hour = RunDir(run).recipe_or_defaults().report.price_per_hour
        except InstillError as exc:
            raise InstillError(f"{exc}; or give --price-per-hour") from None
    md, page = write_run_report(run, price_per_hour)
    out.print(f"written {md} and {page}")


@experiment_app.command("transfer")
def experiment_transfer(
    recipe: str = RECIPE,
    overrides: list[str] = OVERRIDES,
    max_steps: int = option(commands.TransferOptions, "max_steps"),
    overwrite: bool = option(commands.TransferOptions, "overwrite"),
    resume: bool = option(commands.TransferOptions, "resume"),
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
    return option(SamplingConfig, key, "--" + key.replace("_", "-"))


MAX_NEW_TOKENS = _sampling_option("max_new_tokens")
TEMPERATURE = _sampling_option("temperature")
TOP_K = _sampling_option("top_k")
TOP_P = _sampling_option("top_p")
REPETITION_PENALTY = _sampling_option("repetition_penalty")
SEED = _sampling_option("seed")
INT8 = option(commands.ChatOptions, "int8", "--int8")


def _sampling(**values) -> dict:
    """The sampling options, checked against SamplingConfig's limits before the model loads."""
    from pydantic import ValidationError

    try:
        return SamplingConfig(**values).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        option = "--" + str(error["loc"][0]).replace("_", "-")
        raise InstillError(f"{option} {error['input']}: {error['msg']}") from None


def _load_for_decoding(model: str, chat_template: Path | None, int8: bool):
    """The model chat and generate decode with: --int8's kernel checked before the slow load,
    its int8 layers swapped in after it."""
    from instill.infer.int8 import for_int8_decoding, require_int8_kernel
    from instill.models import load_for_inference

    spec = _model_spec(model, chat_template)
    if int8:
        require_int8_kernel()
    loaded = load_for_inference(model, spec)
    if int8:
        for_int8_decoding(loaded.model)
    return loaded


@app.command()
def chat(
    model: str = MODEL,
    system: str = option(commands.ChatOptions, "system"),
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

    params = _sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    _quiet_libraries()
    loaded = _load_for_decoding(model, chat_template, int8)
    session = ChatSession(loaded.model, loaded.tokenizer, system=system, **params)
    session.run(sys.stdin, interactive=sys.stdin.isatty())


@app.command()
def generate(
    model: str = MODEL,
    input: Path = option(commands.GenerateOptions, "input"),
    output: Path = option(commands.GenerateOptions, "output"),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: int = SEED,
    batch_size: int = option(commands.GenerateOptions, "batch_size"),
    chat_template: Path = CHAT_TEMPLATE,
    int8: bool = INT8,
) -> None:
    """Batch generation: one output row per input row, in order; rows already in --output are
    skipped, so an interrupted job continues where it stopped."""
    from instill.infer import GenParams
    from instill.infer.batch import generate_file

    _quiet_libraries()
    params = GenParams(**_sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    ))  # fmt: skip
    if not input.is_file():  # before the slow model load
        raise InstillError(f"{input}: input file not found (--input)")
    loaded = _load_for_decoding(model, chat_template, int8)
    made, skipped = generate_file(
        loaded.model, loaded.tokenizer, input, output, params, batch_size=batch_size
    )
    out.print(f"{output}: {made} rows generated, {skipped} already there")


@app.command()
def serve(
    ctx: typer.Context,
    model: str = MODEL,
    host: str = option(ServeConfig, "host"),
    port: int = option(ServeOptions, "port"),
    api_key: str = option(ServeOptions, "api_key", envvar="INSTILL_API_KEY"),
    api_key_file: Path = option(ServeOptions, "api_key_file"),
    allowed_host: list[str] = option(ServeOptions, "allowed_host", "--allowed-host"),
    chat_template: Path = CHAT_TEMPLATE,
    max_batch: int = option(ServeConfig, "max_batch"),
    max_concurrent: int = option(ServeConfig, "max_concurrent"),
    max_tokens_cap: int = option(ServeConfig, "max_tokens_cap"),
    engine: str = option(ServeOptions, "engine"),
    lora: str = option(ServeOptions, "lora"),
    int8: bool = option(ServeConfig, "int8"),
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


def _pairs_option(key: str):
    """An option of `pairs make` that sets one PairsConfig field."""
    return option(PairsConfig, key, "--" + key.replace("_", "-"))


@pairs_app.command("make")
def pairs_make(
    model: str = MODEL,
    out_file: Path = option(PairsSourceOptions, "out", "--out"),
    k: int = _pairs_option("k"),
    temperature: float = _pairs_option("temperature"),
    per_family: int = _pairs_option("per_family"),
    seed: int = _pairs_option("seed"),
    max_new_tokens: int = _pairs_option("max_new_tokens"),
    threshold: float = _pairs_option("threshold"),
    batch_size: int = _pairs_option("batch_size"),
    pairs_per_prompt: int = _pairs_option("pairs_per_prompt"),
    suite: str = option(PairsSourceOptions, "suite"),
    metric: str = option(PairsSourceOptions, "metric"),
    holdout: list[str] = option(PairsSourceOptions, "holdout", "--holdout"),
    kto: Path = option(PairsSourceOptions, "kto"),
    family: list[str] = option(PairsSourceOptions, "family", "--family"),
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
    model: str = option(InspectOptions, "model"),
    rows: int = option(InspectOptions, "rows"),
    max_length: int = option(InspectOptions, "max_length"),
    as_json: bool = option(InspectOptions, "as_json", "--json"),
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
    fmt: str = option(ExportOptions, "fmt", "--format"),
    quant: str = option(ExportOptions, "quant"),
    max_size: float = option(ExportOptions, "max_size"),
    dtype: str = option(ExportOptions, "dtype"),
    parts: str = option(ExportOptions, "parts"),
    output: Path = option(ExportOptions, "output"),
    overwrite: bool = option(ExportOptions, "overwrite"),
    dequantize: bool = option(ExportOptions, "dequantize"),
    min_agreement: float = option(ExportOptions, "min_agreement"),
    copy_base: bool = option(ExportOptions, "copy_base"),
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
