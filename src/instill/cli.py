"""The `instill` command. Each subcommand parses, builds, runs one stage, and reports.

User mistakes raise InstillError anywhere below; `main` prints them as one line (exit code 2).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer
from rich.markup import escape

from instill.config import load_recipe, recipe_help
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

RECIPES = Path(__file__).parent / "recipes"
OVERRIDES = typer.Argument(None, help="Dotted overrides such as train.lr=1e-4 adapter.r=8.")


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
    from rich.table import Table

    from instill.report import before_after_rows

    b = summary.before.summary() if summary.before else None
    a = summary.after.summary() if summary.after else None
    if b or a:
        table = Table(title="held-out built-in tasks: exact match (%)")
        for col in ("task family", "base", "tuned", "delta"):
            table.add_column(col, justify="left" if col == "task family" else "right")
        for label, x, y in before_after_rows(b, a):
            fmt = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
            delta = "—" if x is None or y is None else f"{100 * (y - x):+.1f}"
            style = "bold" if label == "overall" else None
            table.add_row(label, fmt(x), fmt(y), delta, style=style)
        out.print(table)
    t = summary.train
    out.print(
        f"training: {t.steps} steps, {t.wall_s:.0f} s, {t.tokens:,} tokens at "
        f"{t.tokens_per_s:.0f} tokens/s; loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f}"
    )
    out.print(f"total wall time: {summary.wall_s:.0f} s; run directory: {summary.run_dir}")


def _run(recipe_file: Path, overrides: list[str] | None, overwrite: bool) -> None:
    from instill.pipeline import run_recipe

    recipe = load_recipe(recipe_file, overrides or [])
    _quiet_libraries()
    summary = run_recipe(recipe, overwrite=overwrite)
    if summary.train.interrupted:
        sys.exit(130)
    if not summary.main:
        return
    _print_before_after(summary)
    out.print(f"chat with it: instill chat {summary.run_dir / 'final'}")


@app.command(epilog=recipe_help())
def train(
    recipe: str = typer.Argument(..., help="Recipe YAML file, or a shipped recipe name."),
    overrides: list[str] = OVERRIDES,
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
) -> None:
    """Tune a pretrained model as a recipe says; evaluate before and after; save to runs/<name>/."""
    _run(recipe_path(recipe), overrides, overwrite)


@app.command(epilog=recipe_help())
def quickstart(
    overrides: list[str] = OVERRIDES,
    overwrite: bool = typer.Option(False, help="Replace an existing runs/quickstart."),
) -> None:
    """Evaluate SmolLM2-135M-Instruct on held-out built-in tasks, LoRA-tune it, evaluate again."""
    _run(RECIPES / "quickstart.yaml", overrides, overwrite)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    output: Path = typer.Option(None, help="Folder for results (default: <run>/eval)."),
    per_family: int = typer.Option(12, help="Held-out examples per task family."),
    seed: int = typer.Option(0, help="Seed of the built-in task generator."),
    batch_size: int = typer.Option(32, help="Prompts generated together."),
    max_new_tokens: int = typer.Option(32, help="Longest generated answer."),
) -> None:
    """Score a model on the held-out built-in tasks; write per-example records and a summary."""
    from instill.config import BuiltinDataConfig, EvalConfig
    from instill.eval import evaluate_builtin, write_result
    from instill.models import load_for_inference

    _quiet_libraries()
    loaded = load_for_inference(model)
    path = Path(model)
    folder = output or (path / "eval" if (path / "final").is_dir() else Path("runs") / "eval")
    result = evaluate_builtin(
        loaded.model,
        loaded.tokenizer,
        BuiltinDataConfig(eval_per_family=per_family, seed=seed),
        EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens),
        model,
    )
    written = write_result(result, folder)
    s = result.summary()
    out.print(
        f"exact match {100 * s['exact_match']:.1f}% (95% CI {100 * s['ci95'][0]:.1f}–"
        f"{100 * s['ci95'][1]:.1f}, n={s['n']}); written to {written}"
    )


@app.command()
def chat(
    model: str = typer.Argument(..., help="A run directory, a final/ directory, or a model name."),
    system: str = typer.Option(None, help="System prompt."),
    max_new_tokens: int = typer.Option(256, help="Longest reply."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
) -> None:
    """Chat in the terminal. With stdin from a pipe, each line is a user turn and each reply
    is printed on stdout (commands: /reset, /system TEXT, /params [k=v], /save FILE)."""
    from instill.chat import ChatSession
    from instill.models import load_for_inference

    _quiet_libraries()
    loaded = load_for_inference(model)
    session = ChatSession(
        loaded.model,
        loaded.tokenizer,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    session.run(sys.stdin, interactive=sys.stdin.isatty())


@data_app.command("inspect")
def data_inspect(
    source: str = typer.Argument(..., help="A recipe (its data section) or a data file."),
    model: str = typer.Option("smollm2-135m-instruct", help="Tokenizer and template to use."),
    rows: int = typer.Option(2, help="How many rows to show rendered."),
    max_length: int = typer.Option(512, help="max_length for a data file."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Detected format, counts, length histogram, and rows coloured by what is trained."""
    from instill.inspect import inspect_data

    _quiet_libraries()
    report = inspect_data(
        source, model=model, show_rows=0 if as_json else rows, max_length=max_length
    )
    if as_json:
        print(json.dumps(report, indent=2))


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

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
