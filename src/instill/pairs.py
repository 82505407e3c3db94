"""Self-checked preference pairs from verifiable tasks: `instill pairs make`.

    training prompts: the built-in families' train split (or a suite file with references),
      less every held-out cluster (a run's own eval.holdout_clusters always among them)
    -> k replies to each, sampled in one engine run (infer.generate); reply j of a prompt draws
       from its own generator, seeded from (seed, prompt, j), so the same seed gives the same
       replies whatever shares the batch
    -> each reply scored by its task's own scorer (eval.runner.generation_records)
    -> choose(example, replies, scores): passing and failing replies; a pair when there are both
    -> OUT (format `pairs`), --kto FILE (every distinct reply, labelled), OUT.summary.json

It sits beside recipe.py rather than in data/: it runs a model and the evaluation's scorers,
which data/ (a building block under both) must not know.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from instill.atomic import write_text
from instill.config import EvalConfig, PairsConfig, default
from instill.data import builtin
from instill.data.examples import EvalExample
from instill.errors import InstillError
from instill.eval.tasks import Task
from instill.infer import Generation, GenParams, generate
from instill.jsonl import write_jsonl

BUILTIN_PER_FAMILY = 8  # --per-family's default for the built-in tasks
TEXT_METRICS = ("auto", "exact_match", "contains", "token_f1", "rouge_l")


@dataclass(frozen=True)
class Choice:
    """What one prompt's replies gave: indices into its replies."""

    passing: tuple[int, ...]  # scored at or above the threshold, ended by the model, not empty
    failing: tuple[int, ...]  # the other non-empty replies
    chosen: int | None = None  # the first pair's chosen reply (None: no pair)
    rejected: int | None = None
    cut: int = 0  # replies cut at max_new_tokens (never passing)
    empty: int = 0  # empty replies (in no row: a pair file cannot hold an empty side)
    more: tuple[tuple[int, int], ...] = ()  # further (chosen, rejected) pairs, --pairs-per-prompt

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        if self.chosen is None or self.rejected is None:
            return ()
        return ((self.chosen, self.rejected), *self.more)


def passes(reply: Generation, score: float, threshold: float) -> bool:
    """A reply passes when its score reaches the threshold and the model ended it: a reply cut
    at max_new_tokens would teach the model to stop mid-answer, so it is never chosen."""
    return score >= threshold and reply.finish_reason == "stop"


def choose(
    example: EvalExample,
    replies: Sequence[Generation],
    scores: Sequence[float],
    *,
    threshold: float = 1.0,
    seed: int = 0,
    pairs: int = 1,
) -> Choice:
    """Split one prompt's replies into passing and failing and, with both, pick the pair.

    Chosen: the shortest passing reply (fewest tokens, then characters, then first sampled).
    DPO is known to reward length; choosing the shortest correct reply keeps that bias from
    entering through the data, and a terse correct answer is what the verifiable tasks ask for.
    Rejected: one failing reply drawn by seed among the distinct failing texts, so neither its
    length nor its sampling order decides it.

    pairs > 1: up to that many pairs, each with another distinct failing text (in the seed's
    order) as rejected, against the distinct passing texts shortest first, cycled; the first
    pair is the one above, so raising `pairs` only adds rows."""
    if len(replies) != len(scores):
        raise ValueError(f"{len(replies)} replies but {len(scores)} scores")
    empty = [i for i, r in enumerate(replies) if not r.text.strip()]
    usable = [i for i in range(len(replies)) if i not in empty]
    passing = tuple(i for i in usable if passes(replies[i], scores[i], threshold))
    failing = tuple(i for i in usable if i not in passing)
    cut = sum(r.finish_reason != "stop" for r in replies)
    if not passing or not failing:
        return Choice(passing, failing, cut=cut, empty=len(empty))
    chosen = min(passing, key=lambda i: (replies[i].completion_tokens, len(replies[i].text), i))
    distinct: dict[str, int] = {}
    for i in failing:
        if replies[i].text != replies[chosen].text:
            distinct.setdefault(replies[i].text, i)
    if not distinct:  # only the chosen text again, cut short: nothing to tell apart
        return Choice(passing, failing, cut=cut, empty=len(empty))
    rng = random.Random(f"{seed}:{example.id}")
    rejected = rng.choice(list(distinct.values()))
    more = _more_pairs(replies, passing, chosen, rejected, distinct, rng, pairs - 1)
    return Choice(passing, failing, chosen, rejected, cut, len(empty), more)


def _more_pairs(replies, passing, chosen, rejected, distinct, rng, n: int):
    """Up to n pairs beyond (chosen, rejected): each remaining distinct failing text once (in
    the seed's order, never a text some passing reply also has), each against the next distinct
    passing text, shortest first, cycled."""
    if n <= 0:
        return ()
    good: dict[str, int] = {}
    for i in sorted(passing, key=lambda i: (replies[i].completion_tokens, len(replies[i].text), i)):
        good.setdefault(replies[i].text, i)
    chosen_order = list(good.values())
    rest = [i for i in distinct.values() if i != rejected and replies[i].text not in good]
    rng.shuffle(rest)
    start = chosen_order.index(chosen)
    return tuple(
        (chosen_order[(start + j + 1) % len(chosen_order)], bad) for j, bad in enumerate(rest[:n])
    )


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _meta(example: EvalExample) -> dict:
    return {"task": example.family, "cluster": example.cluster, "id": example.id}


def pair_rows(
    example: EvalExample, replies: Sequence[Generation], scores: Sequence[float], c: Choice
) -> list[dict]:
    """The JSONL rows of a prompt's pairs (format `pairs`, conversational); none without."""
    return [
        {
            "prompt": list(example.prompt),
            "chosen": _reply(replies[good].text),
            "rejected": _reply(replies[bad].text),
            **_meta(example),
            "chosen_score": scores[good],
            "rejected_score": scores[bad],
        }
        for good, bad in c.pairs
    ]


def labelled_rows(
    example: EvalExample, replies: Sequence[Generation], scores: Sequence[float], c: Choice
) -> list[dict]:
    """KTO rows (format `kto`): each distinct non-empty reply once, labelled by whether it
    passed; prompts whose replies all pass (or all fail) give rows too."""
    rows, seen = [], set()
    for i in sorted(c.passing + c.failing):
        if replies[i].text in seen:
            continue
        seen.add(replies[i].text)
        rows.append(
            {
                "prompt": list(example.prompt),
                "completion": _reply(replies[i].text),
                "label": i in c.passing,
                **_meta(example),
                "score": scores[i],
            }
        )
    return rows


def reply_seed(seed: int, example: EvalExample, j: int) -> int:
    """The seed of a prompt's j-th reply, from the prompt's text (not its file path, so a suite
    gives the same replies however its path is spelled)."""
    key = f"{seed}|{example.family}|{json.dumps(example.prompt)}|{j}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)


@dataclass
class FamilyStats:
    cluster: str = ""
    prompts: int = 0
    replies: int = 0
    passing: int = 0
    all_pass: int = 0
    all_fail: int = 0
    pairs: int = 0
    cut: int = 0
    empty: int = 0

    def add(self, c: Choice, k: int) -> None:
        self.prompts += 1
        self.replies += k
        self.passing += len(c.passing)
        self.all_pass += not c.failing and bool(c.passing)
        self.all_fail += not c.passing
        self.pairs += len(c.pairs)
        self.cut += c.cut
        self.empty += c.empty

    def as_dict(self) -> dict:
        rate = round(self.passing / self.replies, 4) if self.replies else 0.0
        return {**self.__dict__, "pass_rate": rate}


@dataclass
class Made:
    pairs: list[dict] = field(default_factory=list)
    labelled: list[dict] = field(default_factory=list)
    by_family: dict[str, FamilyStats] = field(default_factory=dict)


def sample_and_pair(model, tokenizer, task: Task, opts: PairsConfig, max_new_tokens: int) -> Made:
    """k seeded replies to every example of `task`, scored and paired."""
    from rich.progress import Progress

    from instill.console import console

    k = opts.k
    convs, params = [], []
    for ex in task.examples:
        for j in range(k):
            convs.append(list(ex.prompt))
            params.append(
                GenParams(
                    max_new_tokens=max_new_tokens,
                    temperature=opts.temperature,
                    seed=reply_seed(opts.seed, ex, j),
                )
            )
    with Progress(console=console, transient=True) as bar:
        progress = bar.add_task("sampling", total=len(convs))
        gens = generate(
            model, tokenizer, convs, params, batch_size=opts.batch_size,
            on_reply=lambda _i, _g: bar.advance(progress),
        )  # fmt: skip
    scores = score_replies(task, gens, k)
    made = Made()
    for n, ex in enumerate(task.examples):
        replies, own = gens[n * k : (n + 1) * k], scores[n * k : (n + 1) * k]
        c = choose(
            ex, replies, own, threshold=opts.threshold, seed=opts.seed,
            pairs=opts.pairs_per_prompt,
        )  # fmt: skip
        made.pairs += pair_rows(ex, replies, own, c)
        made.labelled += labelled_rows(ex, replies, own, c)
        made.by_family.setdefault(ex.family, FamilyStats(ex.cluster)).add(c, k)
    return made


def score_replies(task: Task, gens: Sequence[Generation], k: int) -> list[float]:
    """Each reply's primary score by its task's own scorer, exactly as evaluation scores it;
    `gens` holds k replies per example, in example order."""
    from instill.eval.runner import generation_records

    repeated = Task(task.name, [ex for ex in task.examples for _ in range(k)], task.metric)
    return [r["score"] for r in generation_records(repeated, gens)]


def run_settings(model: str) -> tuple[list[str], int | None]:
    """A run's held-out clusters and eval.max_new_tokens, read through its typed recipe; for a
    model that is not a run, none and None."""
    from instill.rundir import RunDir

    run = RunDir.of(model)
    if run is None:
        return [], None
    recipe = run.recipe()
    return list(recipe.eval.holdout_clusters), recipe.eval.max_new_tokens


def training_task(
    suite: str, per_family: int | None, seed: int, metric: str, holdout: frozenset[str],
    given: Sequence[str], families: Sequence[str] = (),
) -> Task:  # fmt: skip
    """The prompts to sample: the built-in train split or a suite file's rows, every held-out
    cluster removed. `given`: the clusters the user named, each of which must exist.
    `families`: only these built-in families (each family's prompts are drawn from its own
    seeded generator, so naming families never changes the prompts of the others)."""
    from instill.eval.tasks import builtin_examples, file_task

    if families and suite != "builtin":
        raise InstillError("--family picks built-in families; a suite file has none")
    if suite == "builtin":
        if metric != "auto":
            raise InstillError(f"--metric {metric}: the built-in tasks use their own scorers")
        known = set(builtin.clusters())
        unknown = sorted(set(families) - set(builtin.FAMILIES))
        if unknown:
            raise InstillError(
                f"--family {', '.join(unknown)}: no such built-in family; the families: "
                f"{', '.join(builtin.FAMILIES)}"
            )
        examples = builtin_examples(
            "train", per_family or BUILTIN_PER_FAMILY, seed, list(families) or None
        )
        task = Task("builtin", examples, "builtin")
    else:
        if metric not in TEXT_METRICS:
            raise InstillError(
                f"--metric {metric}: pairs need a reply scored against a reference; choose one "
                f"of {', '.join(TEXT_METRICS)}"
            )
        task = file_task(Path(suite).stem, suite, metric=metric, max_examples=per_family, seed=seed)
        if task.metric == "choice":
            raise InstillError(
                f"--suite {suite}: its rows have 'choices', scored by log-likelihood, not by a "
                "generated reply; give rows with a reference answer"
            )
        known = {ex.cluster for ex in task.examples}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InstillError(
            f"--holdout {', '.join(unknown)}: no such cluster in {suite}; its clusters: "
            f"{', '.join(sorted(known))}"
        )
    task.examples = [ex for ex in task.examples if ex.cluster not in holdout]
    task.holdout = frozenset(holdout)
    if not task.examples:
        raise InstillError(f"--suite {suite}: every prompt is in a held-out cluster; none left")
    return task


def summary_path(out: Path) -> Path:
    return out.with_name(out.name + ".summary.json")


def make_pairs(
    model: str,
    out: Path,
    opts: PairsConfig,
    *,
    suite: str = "builtin",
    metric: str = "auto",
    holdout: Sequence[str] = (),
    kto: Path | None = None,
    spec=None,
    families: Sequence[str] = (),
) -> dict:
    """`instill pairs make`: sample, check, pair, write OUT, --kto and OUT.summary.json; return
    the summary."""
    from instill.eval.runner import check_renders
    from instill.models import load_for_inference

    if kto is not None and Path(kto).resolve() == Path(out).resolve():
        raise InstillError("--kto and --out name the same file; give two files")
    run_holdout, run_tokens = run_settings(model)
    held = frozenset(run_holdout) | frozenset(holdout)
    task = training_task(suite, opts.per_family, opts.seed, metric, held, holdout, families)
    max_new_tokens = opts.max_new_tokens or run_tokens or default(EvalConfig, "max_new_tokens")
    start = time.perf_counter()
    loaded = load_for_inference(model, spec)
    check_renders(loaded.tokenizer, task)
    made = sample_and_pair(loaded.model, loaded.tokenizer, task, opts, max_new_tokens)
    wall_s = time.perf_counter() - start
    write_jsonl(out, made.pairs, "preference pairs")
    if kto is not None:
        write_jsonl(kto, made.labelled, "labelled replies")
    families = {f: s.as_dict() for f, s in sorted(made.by_family.items())}
    replies = sum(s["replies"] for s in families.values())
    summary = {
        "model": model,
        "suite": suite,
        "metric": task.metric,
        "k": opts.k,
        "temperature": opts.temperature,
        "seed": opts.seed,
        "max_new_tokens": max_new_tokens,
        "threshold": opts.threshold,
        "per_family": opts.per_family,
        "families": list(families) or None,
        "pairs_per_prompt": opts.pairs_per_prompt,
        "holdout_clusters": sorted(held),
        "prompts": len(task.examples),
        "prompts_with_pairs": len({(r["task"], r["id"]) for r in made.pairs}),
        "replies": replies,
        "pass_rate": round(sum(s["passing"] for s in families.values()) / replies, 4),
        "pairs_written": len(made.pairs),
        "out": str(out),
        "kto": None if kto is None else str(kto),
        "kto_rows": None if kto is None else len(made.labelled),
        "by_family": families,
        "wall_s": round(wall_s, 1),
    }
    write_text(summary_path(out), json.dumps(summary, indent=2) + "\n", "pairs summary")
    return summary


def summary_table(summary: dict):
    """The per-family table `instill pairs make` prints."""
    from rich.table import Table

    table = Table(title=f"self-checked pairs: {summary['model']}, k={summary['k']}")
    for name in ("family", "cluster", "prompts", "pass rate", "all pass", "all fail", "pairs"):
        table.add_column(name, justify="left" if name in ("family", "cluster") else "right")
    for family, s in summary["by_family"].items():
        table.add_row(
            family, s["cluster"], str(s["prompts"]), f"{100 * s['pass_rate']:.0f}%",
            str(s["all_pass"]), str(s["all_fail"]), str(s["pairs"]),
        )  # fmt: skip
    fams = summary["by_family"].values()
    table.add_row(
        "all", "", str(summary["prompts"]), f"{100 * summary['pass_rate']:.0f}%",
        str(sum(s["all_pass"] for s in fams)), str(sum(s["all_fail"] for s in fams)),
        str(summary["pairs_written"]), style="bold",
    )  # fmt: skip
    return table
