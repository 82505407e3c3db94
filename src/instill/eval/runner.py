"""Run a suite: generate answers greedily in batches, score each, summarise with a 95% CI."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from instill.config import BuiltinDataConfig, EvalConfig
from instill.data import builtin
from instill.infer import GenParams, generate


def bootstrap_ci(scores: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of the mean."""
    if not scores:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


@dataclass
class SuiteResult:
    suite: str
    model: str
    records: list[dict]
    wall_s: float
    by_family: dict[str, float] = field(default_factory=dict)
    by_cluster: dict[str, float] = field(default_factory=dict)

    @property
    def scores(self) -> list[float]:
        return [r["score"] for r in self.records]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.records else 0.0

    def summary(self) -> dict:
        lo, hi = bootstrap_ci(self.scores)
        return {
            "suite": self.suite,
            "model": self.model,
            "metric": "exact_match",
            "n": len(self.records),
            "exact_match": round(self.mean, 4),
            "ci95": [round(lo, 4), round(hi, 4)],
            "by_family": self.by_family,
            "by_cluster": self.by_cluster,
            "wall_s": round(self.wall_s, 2),
        }


def _group_means(records: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for r in records:
        groups.setdefault(r[key], []).append(r["score"])
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}


def evaluate_builtin(
    model, tokenizer, data: BuiltinDataConfig, cfg: EvalConfig, model_name: str
) -> SuiteResult:
    """Score a model on the held-out split of the built-in tasks (exact match per family)."""
    examples = builtin.generate("eval", data.eval_per_family, data.seed, data.families)
    start = time.perf_counter()
    gens = generate(
        model,
        tokenizer,
        [ex.prompt_messages for ex in examples],
        GenParams(max_new_tokens=cfg.max_new_tokens),
        batch_size=cfg.batch_size,
    )
    records = []
    for ex, gen in zip(examples, gens, strict=True):
        records.append(
            {
                "family": ex.family,
                "cluster": ex.cluster,
                "prompt": ex.prompt_messages[-1]["content"],
                "prediction": gen.text,
                "reference": ex.reference,
                "score": builtin.score(ex, gen.text, ex.reference),
            }
        )
    result = SuiteResult("builtin", model_name, records, time.perf_counter() - start)
    result.by_family = _group_means(records, "family")
    result.by_cluster = _group_means(records, "cluster")
    return result


def load_result(folder: Path, stem: str) -> SuiteResult | None:
    """A result written by write_result, or None when it is not there."""
    records_file, summary_file = folder / f"{stem}.jsonl", folder / f"{stem}.json"
    if not (records_file.is_file() and summary_file.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    records = [json.loads(x) for x in records_file.read_text().splitlines() if x]
    result = SuiteResult(summary["suite"], summary["model"], records, summary["wall_s"])
    result.by_family = _group_means(records, "family")
    result.by_cluster = _group_means(records, "cluster")
    return result


def write_result(result: SuiteResult, folder: Path, stem: str | None = None) -> Path:
    """eval/<stem>.jsonl (one record per example) and eval/<stem>.json (the summary)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or result.suite
    with open(folder / f"{stem}.jsonl", "w") as f:
        for r in result.records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return path
