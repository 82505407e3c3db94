"""A task is examples plus a scorer. One form serves the built-in suite, the general suite, a user's
file with references, and the rows of a recipe's own data (validation rows and held-out clusters).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from instill.anchors import prompt_file, shipped_prompts
from instill.data import builtin
from instill.data.examples import EvalExample
from instill.data.formats import (
    Conversation,
    detect_format,
    instruction_text,
    to_conversations,
)
from instill.data.sources import RawRow, read_source
from instill.errors import InstillError
from instill.eval.metrics import METRICS

GENERAL_FILE = Path(__file__).parent / "suite_files" / "general.jsonl"
GEN_SUITE = "general_gen"  # the open prompts' eval split, scored by drift (eval/drift.py)


@dataclass
class Task:
    name: str
    examples: list[EvalExample]
    metric: str  # the primary metric, one of metrics.METRICS
    max_new_tokens: int | None = None  # None: the eval config's value
    holdout: frozenset[str] = field(default_factory=frozenset)  # clusters kept out of training
    anchor: object = None  # metric drift: the base model's replies (drift.Anchor) to score against
    # How the examples were drawn (per family, seed, ...): recorded in each result's summary so
    # that base and tuned records of different splits are never paired (eval/results.py)
    split: dict = field(default_factory=dict)


def _id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12]


def builtin_examples(
    split: str, per_family: int, seed: int, families: list[str] | None = None
) -> list[EvalExample]:
    """One split of the built-in tasks (data/builtin.py) as examples with their own scorers:
    "eval" for evaluation, "train" for what training (and `instill pairs make`) draws on."""
    return [
        EvalExample(
            id=_id(ex.family, json.dumps(ex.messages)),
            prompt=tuple(ex.prompt_messages),
            reference=ex.reference,
            family=ex.family,
            cluster=ex.cluster,
            scorer=ex,
        )
        for ex in builtin.generate(split, per_family, seed, families)
    ]


def builtin_task(
    per_family: int, seed: int, families: list[str] | None = None, holdout=frozenset()
) -> Task:
    """The eval split of the built-in tasks, each scored by its own family's scorer."""
    examples = builtin_examples("eval", per_family, seed, families)
    split = {"per_family": per_family, "seed": seed, "families": families}
    return Task("builtin", examples, "builtin", holdout=frozenset(holdout), split=split)


def _choices(raw: RawRow) -> tuple[tuple[str, ...] | None, str | None]:
    """(choices, answer) of a row that has them; the answer may be the text or an index."""
    choices = raw.data.get("choices")
    if choices is None:
        return None, None
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise InstillError(f"{raw.where}: 'choices' must be a list of two or more strings")
    answer = raw.data.get("answer", raw.data.get("reference"))
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise InstillError(f"{raw.where}: 'answer' index {answer} is outside 'choices'")
        answer = choices[answer]
    if not isinstance(answer, str) or answer not in choices:
        raise InstillError(
            f"{raw.where}: 'answer' must be one of 'choices' (its text or its index); "
            f"got {answer!r}"
        )
    return tuple(choices), answer


def _prompt_only(raw: RawRow) -> list[dict] | None:
    """The user turn of a prompt or instruction row that has no reply (its reference is given
    in a separate field)."""
    d = raw.data
    if isinstance(d.get("prompt"), str) and "completion" not in d:
        return [{"role": "user", "content": d["prompt"]}]
    if isinstance(d.get("instruction"), str) and "output" not in d and "instances" not in d:
        return [{"role": "user", "content": instruction_text(d["instruction"], d.get("input"))}]
    return None


def _reference(raw: RawRow, explicit) -> str | tuple[str, ...]:
    if isinstance(explicit, list):
        if not explicit or not all(isinstance(r, str) for r in explicit):
            raise InstillError(f"{raw.where}: 'references' must be a non-empty list of strings")
        return tuple(explicit)
    if not isinstance(explicit, str):
        raise InstillError(f"{raw.where}: 'reference' must be a string")
    return explicit


def _from_row(raw: RawRow, fmt: str) -> list[EvalExample]:
    """The examples of one row of a suite file (any format the data pipeline reads). The
    reference is the row's `reference`/`references` field (or `answer` among `choices`), else
    the conversation's last assistant reply."""
    choices, answer = _choices(raw)
    explicit = (
        answer if choices is not None else raw.data.get("references", raw.data.get("reference"))
    )
    prompt_only = _prompt_only(raw) if fmt in ("auto", "prompt_completion", "alpaca") else None
    if prompt_only is not None:
        meta = {k: raw.data[k] for k in ("task", "cluster", "dataset", "template") if k in raw.data}
        convs = [Conversation(tuple(prompt_only), raw.where, meta)]
    else:
        fmt = detect_format(raw.data) if fmt == "auto" else fmt
        msgs = raw.data.get("messages")
        open_end = (
            explicit is not None
            and fmt == "messages"
            and isinstance(msgs, list)
            and msgs
            and isinstance(msgs[-1], dict)
            and msgs[-1].get("role") == "user"
        )
        if open_end:  # a prompt ending on the user's turn; the reference is a field of its own
            data = {**raw.data, "messages": [*msgs, {"role": "assistant", "content": "-"}]}
            convs = to_conversations(RawRow(data, raw.file, raw.line), fmt)
        else:
            convs = to_conversations(raw, fmt)
    out = []
    for conv in convs:
        msgs = list(conv.messages)
        if explicit is not None:
            reference = _reference(raw, explicit)
            prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        elif msgs[-1]["role"] == "assistant":
            reference, prompt = msgs[-1]["content"], msgs[:-1]
        else:
            raise InstillError(
                f"{raw.where}: no reference answer; give the row a 'reference' field (or "
                "'references', a list of acceptable answers), or end its conversation with the "
                "assistant's answer"
            )
        if not prompt or prompt[-1]["role"] != "user":
            raise InstillError(f"{raw.where}: the prompt must end with a user message")
        meta = conv.meta
        out.append(
            EvalExample(
                id=_id(conv.source, json.dumps(prompt)),
                prompt=tuple(prompt),
                reference=reference,
                family=str(meta.get("task") or meta.get("template") or meta.get("dataset") or ""),
                cluster=str(meta.get("cluster") or meta.get("task") or ""),
                choices=choices,
                source=conv.source,
            )
        )
    return out


def file_task(
    name: str,
    path: str | Path,
    *,
    metric: str = "auto",
    fmt: str = "auto",
    max_examples: int | None = None,
    seed: int = 0,
) -> Task:
    """A user's suite file. metric auto: choice when rows carry choices, else exact_match.
    metric drift: open prompts scored against the base model (eval/drift.py); references are
    optional there."""
    if not Path(path).exists():
        raise InstillError(f"suite {name}: file not found: {path}")
    if metric == "drift":
        examples = prompt_file(path, f"suite {name}")
        if max_examples is not None and len(examples) > max_examples:
            examples = sample_per_cluster(examples, max_examples, seed)
        return Task(name, examples, "drift", split=_sampled(max_examples, seed))
    examples = [ex for raw in read_source(str(path), "train", None) for ex in _from_row(raw, fmt)]
    if not examples:
        raise InstillError(f"{path}: the suite file holds no rows")
    has_choices = {ex.choices is not None for ex in examples}
    if len(has_choices) > 1:
        raise InstillError(f"{path}: some rows have 'choices' and some do not; split the file")
    if metric == "auto":
        metric = "choice" if has_choices == {True} else "exact_match"
    check_metric(metric, f"suite {name}")
    if metric == "choice" and has_choices != {True}:
        raise InstillError(f"suite {name}: metric choice needs a 'choices' list in every row")
    if max_examples is not None and len(examples) > max_examples:
        examples = sample_per_cluster(examples, max_examples, seed)
    return Task(name, examples, metric, split=_sampled(max_examples, seed))


def _sampled(max_examples: int | None, seed: int) -> dict:
    """The split of a file's rows: all of them, or at most N per cluster drawn by seed."""
    return {"max_examples": max_examples, "seed": seed if max_examples is not None else None}


def general_task() -> Task:
    """Everyday knowledge, science, geography and word sense, outside every tuning set instill
    ships: a forgetting guard, scored by choice log-likelihood (no generation needed)."""
    return file_task("general", GENERAL_FILE, metric="choice")


def general_gen_task(per_kind: int | None = None) -> Task:
    """Open-ended everyday requests (explain, advise, write, rewrite, plan, code, compare,
    summarise), none from the built-in task families, scored by generation against the base
    model: drift, reply length, short replies (eval/drift.py)."""
    examples = shipped_prompts("eval")
    if per_kind is not None:  # the first per_kind of each kind: the same prompts in every run
        taken: dict[str, int] = {}
        keep = []
        for ex in examples:
            taken[ex.family] = taken.get(ex.family, 0) + 1
            if taken[ex.family] <= per_kind:
                keep.append(ex)
        examples = keep
    return Task(GEN_SUITE, examples, "drift", split={"per_kind": per_kind})


def conversations_task(
    name: str,
    conversations: list[Conversation],
    *,
    metric: str,
    holdout=frozenset(),
    max_per_cluster: int | None = None,
    seed: int = 0,
) -> Task:
    """Rows of a recipe's own data (validation rows, rows of held-out clusters): the prompt is
    everything before the last assistant reply, the reference is that reply."""
    examples = []
    for conv in conversations:
        msgs = list(conv.messages)
        if msgs[-1]["role"] != "assistant":
            continue  # plain text rows have no reply to score
        meta = conv.meta
        examples.append(
            EvalExample(
                id=_id(conv.source, json.dumps(msgs)),
                prompt=tuple(msgs[:-1]),
                reference=msgs[-1]["content"],
                family=str(meta.get("task") or meta.get("template") or meta.get("dataset") or ""),
                cluster=str(meta.get("cluster") or meta.get("task") or ""),
                source=conv.source,
            )
        )
    if max_per_cluster is not None:
        examples = sample_per_cluster(examples, max_per_cluster, seed)
    check_metric(metric, f"suite {name}")
    split = _sampled(max_per_cluster, seed)
    return Task(name, examples, metric, holdout=frozenset(holdout), split=split)


def sample_per_cluster(examples: list[EvalExample], n: int, seed: int) -> list[EvalExample]:
    """At most n examples of each cluster, chosen by seed, in their original order."""
    by_cluster: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_cluster.setdefault(ex.cluster, []).append(i)
    keep: set[int] = set()
    for cluster, idx in by_cluster.items():
        keep.update(random.Random(f"{seed}:{cluster}").sample(idx, min(n, len(idx))))
    return [ex for i, ex in enumerate(examples) if i in keep]


def check_metric(metric: str, where: str) -> None:
    if metric not in METRICS:
        raise InstillError(
            f"{where}: unknown metric '{metric}'; choose one of {', '.join(METRICS)}"
        )
