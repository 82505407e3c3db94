"""`instill experiment transfer`: the same recipe three ways, so one report can answer the four
claims of tuning a pretrained model.

  pretrained, tuned   the recipe as written (its base evaluation is the third way:
  pretrained, untuned  the same model before tuning, on the same suites)
  scratch, tuned      the same architecture from random weights, the same data, steps, batch and
                      learning rate; all weights trained (an adapter on random weights has
                      nothing to adapt)

Both trainings log validation loss from step 0 on the same validation rows, so the report can
say how many steps and tokens the pretrained start saved to reach the scratch model's best.
"""

from __future__ import annotations

from pathlib import Path

from instill.config import Recipe
from instill.console import console
from instill.errors import InstillError


def _with(recipe: Recipe, **sections) -> Recipe:
    data = recipe.model_dump(mode="json")
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return Recipe.model_validate(data)


def plan(recipe: Recipe, max_steps: int | None = None) -> tuple[Path, Recipe, Recipe, list[str]]:
    """(experiment folder, pretrained recipe, scratch recipe, what was changed and why)."""
    folder = Path(recipe.train.output_dir) / f"{recipe.name}-transfer"
    notes = []
    train: dict = {"output_dir": str(folder)}
    data: dict = {}
    if max_steps is not None:
        train["max_steps"] = max_steps
        notes.append(f"train.max_steps={max_steps} (the budget of both trainings)")
    if not recipe.data.validation:
        data["validation"] = 0.1
        notes.append("data.validation=0.1 (validation loss is how the two starts are compared)")
    if recipe.train.eval_every is None:
        steps = max_steps or recipe.train.max_steps
        every = max(1, (steps or 100) // 10)
        train["eval_every"] = every
        notes.append(f"train.eval_every={every} (validation curves for both starts)")
    if recipe.model.quantize != "none":
        raise InstillError(
            "experiment transfer: model.quantize must be none (a 4-bit base cannot be trained "
            "from scratch)"
        )
    pretrained = _with(recipe, name="pretrained", train=train, data=data)
    # Drift suites measure a tuned model against its own base; random weights make no base to
    # keep, and replay from them would teach noise: the scratch run has neither.
    suites = [
        s
        for s in pretrained.model_dump(mode="json")["eval"]["suites"]
        if s != "general_gen" and not (isinstance(s, dict) and s.get("metric") == "drift")
    ]
    # every weight of the scratch model trains: a recipe's adapter.freeze (full.yaml freezes
    # embed_tokens) would leave its random embeddings, and the head tied to them, untrained
    scratch = _with(
        pretrained,
        name="scratch",
        model={"init": "scratch"},
        adapter={"method": "full", "freeze": []},
        eval={"before": False, "suites": suites},
        data={"replay": None},
        train={"kl_to_base": 0.0},
    )
    if recipe.adapter.freeze:
        notes.append(
            f"scratch run: adapter.freeze {list(recipe.adapter.freeze)} dropped (random "
            "weights must all train)"
        )
    if len(suites) < len(recipe.eval.suites):
        notes.append("scratch run: no drift suites (general_gen) and no replay (no base to keep)")
    return folder, pretrained, scratch, notes


def transfer(
    recipe: Recipe,
    *,
    max_steps: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> Path | None:
    """Run both trainings and write the report; its path, or None when a training was
    interrupted (its checkpoint is kept; `resume=True` continues the experiment: a finished
    training is kept, an unfinished one continues from its last checkpoint)."""
    from instill.recipe import run_recipe
    from instill.report.experiment_report import write_transfer_report

    folder, pretrained, scratch, notes = plan(recipe, max_steps)
    if overwrite and resume:
        raise InstillError("experiment transfer: --overwrite and --resume exclude each other")
    if folder.exists() and any(folder.iterdir()) and not (overwrite or resume):
        raise InstillError(
            f"{folder} already holds an experiment; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    for note in notes:
        console.print(f"experiment: {note}")
    steps = (
        ("1/2", "the pretrained model, tuned (and evaluated before tuning)", pretrained),
        ("2/2", "the same architecture from random weights, tuned alike", scratch),
    )
    for label, what, r in steps:
        run_dir = folder / r.name
        if resume and (run_dir / "final").exists() and (run_dir / "run.json").is_file():
            console.print(f"[bold]{label}[/bold] {what}: finished before, kept")
            continue
        console.print(f"[bold]{label}[/bold] {what}")
        if resume:
            r = _with(r, train={"resume": "auto"})
        summary = run_recipe(r, overwrite=not resume)
        if summary.train.interrupted:
            console.print(
                "[yellow]experiment interrupted[/yellow]: the other training was not started; "
                "continue with `instill experiment transfer ... --resume`"
            )
            return None
    return write_transfer_report(folder, recipe.report.price_per_hour)
