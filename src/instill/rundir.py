"""One run directory, runs/NAME/: the only module that spells the names inside it, and the typed
reader of what it holds.

    config.yaml          the recipe as resolved       recipe(): back through config/'s schema
    run.json             the run record                record()
    data_stats.json      where the data's rows went    data_stats
    skipped_rows.jsonl   rows skipped, with reasons
    metrics.jsonl        one line per logged step      metrics
    tensorboard/         the same, when tensorboard is installed
    checkpoints/         resumable state (best/: the best validation point)
    final/               the tuned model
    eval/                the run's own before/after results (compare and report read them)
    eval/deployed/NAME/  an export's score as deployed (instill eval EXPORT --engine llama.cpp)
    evals/NAME/          later evaluations of the run (instill eval RUN)
    export/FORMAT-TYPE/  exports (instill export)
    report.md, report.html and the plots *.png

The recipe is read through the typed schema, so every default comes from config/ and none is
copied here; a run written by an earlier version whose config.yaml no longer validates is one
error naming the file and the key, not a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from instill.config import BuiltinDataConfig, Recipe
from instill.errors import InstillError

CONFIG = "config.yaml"
RECORD = "run.json"
DATA_STATS = "data_stats.json"
SKIPPED_ROWS = "skipped_rows.jsonl"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"  # checkpoints/best
FINAL = "final"
RESULTS = "eval"  # the run's own before/after, which compare and report read
DEPLOYED = "deployed"  # eval/deployed/<export>
EVALUATIONS = "evals"  # evals/<name>: later evaluations of the run
EXPORTS = "export"
MANIFEST = "instill.json"  # an export folder's record
REPORT = "report"  # report.md and report.html
LOSS_PLOT = "loss_curve.png"
PERFORMANCE_PLOT = "performance.png"
GENERALISATION_PLOT = "generalisation.png"

# What `instill train` (and export, report) writes at the top of a run directory
ENTRIES = frozenset(
    {
        CONFIG, METRICS, CHECKPOINTS, FINAL, DATA_STATS, SKIPPED_ROWS, RESULTS, TENSORBOARD,
        RECORD, f"{REPORT}.md", f"{REPORT}.html", LOSS_PLOT, PERFORMANCE_PLOT,
        GENERALISATION_PLOT, EXPORTS, EVALUATIONS, ".write-test",
    }
)  # fmt: skip


@dataclass(frozen=True)
class RunSplit:
    """The held-out split and answer length a run was evaluated with (its recipe's)."""

    per_family: int
    seed: int
    families: list[str] | None
    holdout: list[str]
    max_new_tokens: int
    general_gen_per_kind: int | None = None


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- where things are
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def record_file(self) -> Path:
        return self.root / RECORD

    @property
    def data_stats(self) -> Path:
        return self.root / DATA_STATS

    @property
    def skipped_rows(self) -> Path:
        return self.root / SKIPPED_ROWS

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def deployed(self) -> Path:
        return self.results / DEPLOYED

    @property
    def evaluations(self) -> Path:
        return self.root / EVALUATIONS

    @property
    def exports(self) -> Path:
        return self.root / EXPORTS

    def plot(self, name: str) -> Path:
        return self.root / name

    def deployed_score(self, export: str | Path) -> Path:
        """eval/deployed/<export folder's name>/: where an export's deployed score goes."""
        return self.deployed / Path(str(export).rstrip("/")).name

    def deployed_scores(self) -> list[Path]:
        """The folders of eval/deployed/, in name order."""
        return sorted(p for p in self.deployed.glob("*") if p.is_dir())

    def evaluation(self, name: str) -> Path:
        """evals/<name>/, for a name that is one plain folder name."""
        if not name or name in (".", "..") or Path(name).name != name:
            raise InstillError(f"--name {name!r}: give a plain folder name (no / or ..)")
        return self.evaluations / name

    def export(self, name: str) -> Path:
        return self.exports / name

    def export_manifests(self) -> list[Path]:
        """export/*/instill.json, in name order."""
        return sorted(self.exports.glob(f"*/{MANIFEST}"))

    # -- what it is
    @property
    def finished(self) -> bool:
        """It holds a tuned model (final/)."""
        return self.final.is_dir()

    @classmethod
    def of(cls, model: str | Path) -> RunDir | None:
        """The run `model` names (a run directory, or its final/), else None."""
        path = Path(model)
        if (path / FINAL).is_dir():
            return cls(path)
        if path.name == FINAL and path.is_dir() and (path.parent / CONFIG).is_file():
            return cls(path.parent)
        return None

    @classmethod
    def given_as_model(cls, model: str | Path) -> RunDir | None:
        """A finished run named as a model (the run directory or its final/) that has its
        recipe, else None."""
        path = Path(model)
        for folder in (path, path.parent):
            run = cls(folder)
            if run.config.is_file() and run.finished:
                return run
        return None

    @classmethod
    def holding(cls, folder: Path) -> RunDir | None:
        """The run whose final/ or checkpoints/<step>/ is `folder`: the nearest of its parent
        and grandparent that has a config.yaml, else None."""
        for parent in (folder.parent, folder.parent.parent):
            if (parent / CONFIG).is_file():
                return cls(parent)
        return None

    # -- what it holds
    def recipe(self) -> Recipe:
        """config.yaml through the typed schema (its defaults for what it leaves out)."""
        from instill.config.load import load_recipe

        if not self.config.is_file():
            raise InstillError(f"{self.config}: not found; {self.root} holds no run recipe")
        try:
            return load_recipe(self.config)
        except InstillError as exc:
            raise InstillError(
                f"{exc}\n{self.config} does not read as a recipe of this version of instill "
                "(a run written by another version?): change or remove that key in it"
            ) from None

    def recipe_or_reason(self) -> tuple[Recipe | None, str]:
        """The recipe, or None and why not (missing, or no longer valid): for a report that
        shows what it can of an old run rather than nothing."""
        from instill.config.load import load_recipe

        if not self.config.is_file():
            return None, f"{self.config} is missing"
        try:
            return load_recipe(self.config), ""
        except InstillError as exc:
            return None, f"{self.config} does not read as a recipe of this version ({exc})"

    def recipe_or_defaults(self) -> Recipe:
        """The run's recipe, or the schema's defaults when it has no config.yaml (what every
        recipe key means when it is not given)."""
        return self.recipe() if self.config.is_file() else Recipe()

    def record(self) -> dict:
        """run.json, or {} when the run has none (unfinished, or written before it existed)."""
        path = self.record_file
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def split(self) -> RunSplit:
        """The held-out split and answer length the run's own evaluation used."""
        return split_of(self.recipe_or_defaults())


def split_of(recipe: Recipe) -> RunSplit:
    """The held-out split and answer length a recipe evaluates with."""
    builtin = recipe.data.builtin or BuiltinDataConfig()
    ev = recipe.eval
    return RunSplit(
        builtin.eval_per_family,
        builtin.seed,
        builtin.families,
        list(ev.holdout_clusters),
        ev.max_new_tokens,
        ev.general_gen_per_kind,
    )
