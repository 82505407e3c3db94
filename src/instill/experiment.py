"""`instill experiment transfer`: the same recipe three ways (four with replay), so one report
can answer the four claims of tuning a pretrained model.

  pretrained, tuned   the recipe without replay rows or a KL term to the base (its base
  pretrained, untuned  evaluation is the second way: the same model before tuning, same suites)
  scratch, tuned      the same architecture from random weights, the same rows, steps, batch and
                      learning rate; all weights trained (an adapter on random weights has
                      nothing to adapt)
  shipped             the recipe as written, when it replays the base's replies: not part of
                      the comparison, shown beside it (the untuned scores are the pretrained's)

Both trainings log validation loss from step 0 on the same validation rows, so the report can
say how many steps and tokens the pretrained start saved to reach the scratch model's best.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instill.config import Recipe
from instill.console import console
from instill.errors import InstillError
from instill.rundir import RunDir


def _with(recipe: Recipe, **sections) -> Recipe:
    data = recipe.model_dump(mode="json")
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return Recipe.model_validate(data)


WHAT = {
    "pretrained": "the pretrained model, tuned (and evaluated before tuning)",
    "scratch": "the same architecture from random weights, tuned alike",
    "shipped": "the pretrained model, tuned by the recipe as written",
}


@dataclass(frozen=True)
class Plan:
    folder: Path
    pretrained: Recipe  # the pretrained start, on the scratch run's rows (the comparison)
    scratch: Recipe
    shipped: Recipe | None  # the recipe as written, when it trains on other rows (replay)
    notes: list[str]  # what was changed and why

    @property
    def runs(self) -> list[Recipe]:
        return [r for r in (self.pretrained, self.scratch, self.shipped) if r is not None]


def plan(recipe: Recipe, max_steps: int | None = None) -> Plan:
    """The trainings of the experiment, each a recipe; the folder that holds them."""
    folder = Path(recipe.train.output_dir) / f"{recipe.name}-transfer"
    notes = []
    train: dict = {"output_dir": str(folder)}
    data: dict = {}
    if max_steps is not None:
        train["max_steps"] = max_steps
        notes.append(f"train.max_steps={max_steps} (the budget of every training)")
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
    as_written = _with(recipe, train=train, data=data)
    # Replay rows are the base model's own replies, and the KL term pulls toward the base: random
    # weights have neither worth keeping, and a scratch run trained on the pretrained model's
    # replies would be taught by it. So both starts train without them, on the same rows and
    # steps; the recipe as written, when it differs, is a third training shown beside them.
    pretrained = _with(
        as_written, name="pretrained", data={"replay": None}, train={"kl_to_base": 0.0}
    )
    shipped = None
    if pretrained.data != as_written.data or pretrained.train != as_written.train:
        # its untuned scores are the pretrained run's: the same weights on the same suites
        shipped = _with(as_written, name="shipped", eval={"before": False})
        notes.append(
            "pretrained run: no data.replay and train.kl_to_base 0, the scratch run's rows; "
            "the recipe as written runs too, as 'shipped'"
        )
    # Drift suites measure a tuned model against its own base: random weights make no base.
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
    )
    if recipe.adapter.freeze:
        notes.append(
            f"scratch run: adapter.freeze {list(recipe.adapter.freeze)} dropped (random "
            "weights must all train)"
        )
    if len(suites) < len(recipe.eval.suites):
        notes.append("scratch run: no drift suites (general_gen: no base to keep)")
    return Plan(folder, pretrained, scratch, shipped, notes)


def _finished_as_planned(run_dir: Path, r: Recipe) -> bool:
    """Whether `run_dir` holds a finished training of `r`, which --resume keeps. One trained
    with other settings (begun by an older instill, or with other overrides) is an error: kept,
    it would sit in the comparison as if it were the planned run."""
    if not (RunDir(run_dir).final.exists() and RunDir(run_dir).record_file.is_file()):
        return False
    from instill.report.arms import NOT_SETTINGS, config_settings, flatten

    had, want = config_settings(run_dir), flatten(r.model_dump(mode="json"))
    changed = sorted(
        k for k in set(had) | set(want) if k not in NOT_SETTINGS and had.get(k) != want.get(k)
    )
    if changed:
        raise InstillError(
            f"{run_dir}: trained with other settings than this experiment plans "
            f"({', '.join(changed)}); pass --overwrite to run the experiment again"
        )
    return True


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

    p = plan(recipe, max_steps)
    folder = p.folder
    if overwrite and resume:
        raise InstillError("experiment transfer: --overwrite and --resume exclude each other")
    if folder.exists() and any(folder.iterdir()) and not (overwrite or resume):
        raise InstillError(
            f"{folder} already holds an experiment; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    for note in p.notes:
        console.print(f"experiment: {note}")
    for i, r in enumerate(p.runs, 1):
        label, what = f"{i}/{len(p.runs)}", WHAT[r.name]
        run_dir = folder / r.name
        if resume and _finished_as_planned(run_dir, r):
            console.print(f"[bold]{label}[/bold] {what}: finished before, kept")
            continue
        console.print(f"[bold]{label}[/bold] {what}")
        if resume:
            r = _with(r, train={"resume": "auto"})
        summary = run_recipe(r, overwrite=not resume)
        if summary.train.interrupted:
            console.print(
                "[yellow]experiment interrupted[/yellow]: the trainings after it were not "
                "started; "
                "continue with `instill experiment transfer ... --resume`"
            )
            return None
    return write_transfer_report(folder, recipe.report.price_per_hour, recipe.report.currency)
