"""Run a task: generate answers greedily in batches (or rank given choices by log-likelihood),
score every example with every applicable metric, and summarise with 95% confidence intervals,
per family and per cluster, seen and held-out clusters apart.

eval/<suite>.jsonl holds one record per example; eval/<suite>.json the summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from instill.atomic import write_text
from instill.config import EvalConfig
from instill.data import builtin
from instill.data.constraints import check_all
from instill.errors import InstillError
from instill.eval.likelihood import choose, perplexity, reply_logprobs
from instill.eval.metrics import bootstrap_ci, text_scores
from instill.eval.results import (
    RECORDS_SHA256,
    MismatchedResult,
    read_records,
    read_summary,
    records_sha256,
)
from instill.eval.tasks import Task
from instill.infer import GenParams, generate
from instill.jsonl import write_jsonl


def _stat(scores: list[float]) -> dict:
    lo, hi = bootstrap_ci(scores)
    mean = sum(scores) / len(scores) if scores else 0.0
    # 6 decimals: a percentage printed to 0.1 from the summary agrees with one from the records
    return {"score": round(mean, 6), "ci95": [round(lo, 6), round(hi, 6)], "n": len(scores)}


@dataclass
class SuiteResult:
    suite: str
    model: str
    records: list[dict]
    wall_s: float
    metric: str = "exact_match"
    holdout: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # loss / perplexity when measured
    split: dict | None = None  # how the examples were drawn (Task.split); None: not recorded

    @property
    def scores(self) -> list[float]:
        return [r["score"] for r in self.records]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.records else 0.0

    def _groups(self, key: str) -> dict[str, list[float]]:
        groups: dict[str, list[float]] = {}
        for r in self.records:
            groups.setdefault(r.get(key) or "", []).append(r["score"])
        return dict(sorted(groups.items()))

    @property
    def by_family(self) -> dict[str, float]:
        return {k: _stat(v)["score"] for k, v in self._groups("family").items()}

    @property
    def by_cluster(self) -> dict[str, float]:
        return {k: _stat(v)["score"] for k, v in self._groups("cluster").items()}

    def summary(self) -> dict:
        metrics: dict[str, list[float]] = {}
        for r in self.records:
            for name, value in r.get("scores", {}).items():
                metrics.setdefault(name, []).append(value)
        clusters = {
            k: {**_stat(v), "seen": k not in self.holdout}
            for k, v in self._groups("cluster").items()
        }
        out = {
            "suite": self.suite,
            "model": self.model,
            "metric": self.metric,
            **_stat(self.scores),
            "metrics": {k: round(sum(v) / len(v), 4) for k, v in sorted(metrics.items())},
            "by_family": self.by_family,
            "by_cluster": clusters,
            "holdout_clusters": sorted(self.holdout),
            **({} if self.split is None else {"split": self.split}),
            "wall_s": round(self.wall_s, 2),
            **self.extra,
        }
        checks = [
            (name.split("(")[0], ok)
            for r in self.records
            for name, ok in r.get("constraints", {}).items()
        ]
        if checks:  # IFEval's instruction level: each constraint on its own, by kind
            kinds: dict[str, list[float]] = {}
            for kind, ok in checks:
                kinds.setdefault(kind, []).append(float(ok))
            out["constraints"] = {
                "instruction_level": _stat([float(ok) for _, ok in checks]),
                "by_kind": {k: _stat(v) for k, v in sorted(kinds.items())},
            }
        if self.metric == "drift":  # drift, length and short replies against the base model
            from instill.eval.drift import generation_summary

            out["generation"] = generation_summary(self.records)
        if self.holdout:
            for side, seen in (("seen", True), ("unseen", False)):
                scores = [r["score"] for r in self.records if r.get("seen", True) is seen]
                out[side] = _stat(scores)
        return out


def _primary(metric: str, scores: dict[str, float]) -> float:
    return scores[metric]


def _record(ex, task: Task, **fields) -> dict:
    """The fields every record carries, then the scorer's own."""
    return {
        "id": ex.id,
        "family": ex.family,
        "cluster": ex.cluster,
        "seen": ex.cluster not in task.holdout,
        "prompt": ex.prompt[-1]["content"],
        **fields,
    }


def _generation_records(model, tokenizer, task: Task, cfg: EvalConfig) -> list[dict]:
    params = GenParams(max_new_tokens=task.max_new_tokens or cfg.max_new_tokens)
    gens = generate(
        model,
        tokenizer,
        [list(ex.prompt) for ex in task.examples],
        params,
        batch_size=cfg.batch_size,
    )
    return generation_records(task, gens)


def generation_records(task: Task, gens) -> list[dict]:
    """Score each example's generated reply (from any engine: ours, llama.cpp) with every
    applicable metric."""
    records = []
    for ex, gen in zip(task.examples, gens, strict=True):
        scores = text_scores(gen.text, ex.reference)
        extra = {}
        if task.metric == "builtin":
            scores["builtin"] = builtin.score(ex.scorer, gen.text, ex.reference)
            if ex.scorer.constraints:  # which of the prompt's constraints the reply obeyed
                extra["constraints"] = check_all(ex.scorer.constraints, gen.text)
        records.append(
            _record(
                ex,
                task,
                prediction=gen.text,
                reference=ex.reference,
                finish_reason=gen.finish_reason,
                score=_primary(task.metric, scores),
                scores=scores,
                **extra,
            )
        )
    return records


def _choice_records(model, tokenizer, task: Task, cfg: EvalConfig) -> list[dict]:
    picks = choose(
        model,
        tokenizer,
        [list(ex.prompt) for ex in task.examples],
        [list(ex.choices or ()) for ex in task.examples],
        batch_size=max(1, cfg.batch_size // 4),
    )
    records = []
    for ex, (best, option_scores) in zip(task.examples, picks, strict=True):
        prediction = ex.choices[best]
        score = float(prediction == ex.reference)
        records.append(
            _record(
                ex,
                task,
                choices=list(ex.choices),
                choice_logprobs=[round(s, 4) for s in option_scores],
                prediction=prediction,
                reference=ex.reference,
                score=score,
                scores={"choice": score},
            )
        )
    return records


def check_renders(tokenizer, task: Task) -> None:
    """Every prompt must render through the model's chat template; say which one does not."""
    from jinja2 import TemplateError

    from instill.data.render import render_text

    for ex in task.examples:
        try:
            render_text(tokenizer, ex.prompt, generation_prompt=True)
        except TemplateError as exc:
            where = ex.source or f"example {ex.id}"
            raise InstillError(
                f"suite {task.name}, {where}: the model's chat template cannot render this "
                f"prompt ({exc}); change the prompt's messages or set model.chat_template"
            ) from None


def evaluate(
    model, tokenizer, task: Task, cfg: EvalConfig, model_name: str, *, loss: bool = False
) -> SuiteResult:
    """Score a model on a task. loss: also the reference replies' loss and perplexity."""
    if not task.examples:
        raise InstillError(f"suite {task.name}: no examples to evaluate")
    check_renders(tokenizer, task)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if task.metric == "choice":
            records = _choice_records(model, tokenizer, task, cfg)
        elif task.metric == "drift":
            from instill.eval.drift import drift_records

            if task.anchor is None:
                raise InstillError(
                    f"suite {task.name}: scored against a base model's replies, and none were "
                    "given (instill eval: --base MODEL)"
                )
            records = drift_records(model, tokenizer, task.examples, task.anchor, cfg.batch_size)
        else:
            records = _generation_records(model, tokenizer, task, cfg)
        extra = {}
        if loss:
            convs = [
                [*ex.prompt, {"role": "assistant", "content": _first(ex.reference)}]
                for ex in task.examples
            ]
            per_row = reply_logprobs(
                model, tokenizer, convs, batch_size=max(1, cfg.batch_size // 4)
            )
            for r, s in zip(records, per_row, strict=True):
                r["loss"] = round(-s.logprob / s.tokens, 4) if s.tokens else None
            mean_loss, ppl = perplexity(per_row)
            extra = {"loss": round(mean_loss, 4), "perplexity": round(ppl, 3)}
    finally:
        model.train(was_training)
    return SuiteResult(
        task.name,
        model_name,
        records,
        time.perf_counter() - start,
        metric=task.metric,
        holdout=sorted(task.holdout),
        extra=extra,
        split=task_split(task),
    )


def task_split(task: Task) -> dict:
    """What a result records of how its examples were drawn: the suite, its Task.split and the
    held-out clusters (eval/results.check_same_split compares two of these)."""
    return {"suite": task.name, **task.split, "holdout_clusters": sorted(task.holdout)}


def _first(reference) -> str:
    return reference if isinstance(reference, str) else reference[0]


def load_result(folder: Path, stem: str) -> SuiteResult | None:
    """A result written by write_result, or None when it is not there."""
    try:
        summary, records = read_summary(folder, stem), read_records(folder, stem)
    except MismatchedResult:  # cut short between its two files: evaluated again
        return None
    if summary is None or records is None:
        return None
    extra = {k: summary[k] for k in ("loss", "perplexity") if k in summary}
    return SuiteResult(
        summary["suite"],
        summary["model"],
        records,
        summary["wall_s"],
        metric=summary.get("metric", "exact_match"),
        holdout=summary.get("holdout_clusters", []),
        extra=extra,
        split=summary.get("split"),
    )


def write_result(result: SuiteResult, folder: Path, stem: str | None = None) -> Path:
    """<folder>/<stem>.jsonl (one record per example), then <folder>/<stem>.json (the summary,
    with the records' sha256: a kill between the two writes leaves a pair the reader refuses)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or result.suite
    records = folder / f"{stem}.jsonl"
    write_jsonl(records, result.records, "eval records")
    summary = {**result.summary(), RECORDS_SHA256: records_sha256(records)}
    path = folder / f"{stem}.json"
    write_text(path, json.dumps(summary, indent=2) + "\n", "eval summary")
    return path
