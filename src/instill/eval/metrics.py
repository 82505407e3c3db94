"""Text metrics for generated answers, and the bootstrap confidence interval of a mean (of
independent examples, or clustered: examples sharing a prompt resampled together).

Every generation record is scored with all of them (they are cheap), so a summary can report
each; a suite names one as its primary metric. Exact match and containment compare texts after
`normalize`: case folded, surrounding whitespace, quotes and backticks removed, trailing
sentence punctuation (. ! ?) removed, inner whitespace collapsed. (The built-in tasks use their
own, case-sensitive scorer, because some of them ask for a given case.)
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache

TEXT_METRICS = ("exact_match", "contains", "token_f1", "rouge_l")
# choice: accuracy over given choices by log-likelihood; constraints: built-in verifiable checks
METRICS = (*TEXT_METRICS, "choice", "builtin", "drift")

_WORD = re.compile(r"\w+", re.UNICODE)
_EDGES = " \t\n\r\"'`"


def normalize(text: str) -> str:
    """The comparison form of an answer for exact match and containment."""
    s = text.strip(_EDGES)
    while s and s[-1] in ".!?":
        s = s[:-1].strip(_EDGES)
    return re.sub(r"\s+", " ", s).casefold()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """1 when the normalised reference appears in the normalised prediction as whole words."""
    ref = normalize(reference)
    if not ref:
        return float(not normalize(prediction))
    pattern = r"(?<!\w)" + re.escape(ref) + r"(?!\w)"
    return float(re.search(pattern, normalize(prediction)) is not None)


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits and underscore), punctuation dropped."""
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 between the word tokens of the two texts."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), from the rouge-score package."""
    if not prediction.strip() and not reference.strip():
        return 1.0
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


SCORERS = {
    "exact_match": exact_match,
    "contains": contains,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def text_scores(prediction: str, reference: str | list[str]) -> dict[str, float]:
    """Every text metric; with several references, the best score for each metric."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    return {
        name: round(float(max(f(prediction, r) for r in refs)), 6) for name, f in SCORERS.items()
    }


def bootstrap_ci(scores: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of the mean."""
    if not scores:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def bootstrap_ratio_ci(
    num: list[float], den: list[float], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of sum(num) / sum(den), pairs resampled together."""
    if not num:
        return (0.0, 0.0)
    rng = random.Random(seed)
    idx = range(len(num))
    ratios = []
    for _ in range(n_boot):
        pick = rng.choices(idx, k=len(num))
        ratios.append(sum(num[i] for i in pick) / max(1e-12, sum(den[i] for i in pick)))
    ratios.sort()
    return ratios[int(0.025 * n_boot)], ratios[int(0.975 * n_boot) - 1]


def bootstrap_delta_ci(
    a: list[float], b: list[float], *, paired: bool, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of mean(b) - mean(a). Paired: the same examples scored twice, resampled
    together (tighter, and right for before/after on one suite); unpaired: each side resampled."""
    if not a or not b:
        return (0.0, 0.0)
    rng = random.Random(seed)
    deltas = []
    if paired:
        if len(a) != len(b):
            raise ValueError("paired bootstrap needs the same examples on both sides")
        diff = [y - x for x, y in zip(a, b, strict=True)]
        n = len(diff)
        deltas = [sum(rng.choices(diff, k=n)) / n for _ in range(n_boot)]
    else:
        for _ in range(n_boot):
            ra, rb = rng.choices(a, k=len(a)), rng.choices(b, k=len(b))
            deltas.append(sum(rb) / len(rb) - sum(ra) / len(ra))
    deltas.sort()
    return deltas[int(0.025 * n_boot)], deltas[int(0.975 * n_boot) - 1]


def bootstrap_clustered_ci(
    scores: list[float], clusters: list, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `scores` when examples of one cluster
    (e.g. pairs sharing a prompt) are not independent: whole clusters are resampled, and each
    resample's mean is over the examples it holds. With one example per cluster it equals
    bootstrap_ci (the same draws)."""
    if not scores:
        return (0.0, 0.0)
    if len(clusters) != len(scores):
        raise ValueError("one cluster per score")
    groups: dict = {}
    for score, cluster in zip(scores, clusters, strict=True):
        total, n = groups.get(cluster, (0.0, 0))
        groups[cluster] = (total + score, n + 1)
    sums = list(groups.values())
    rng = random.Random(seed)
    means = []
    for _ in range(n_boot):
        pick = rng.choices(sums, k=len(sums))
        means.append(sum(t for t, _ in pick) / sum(n for _, n in pick))
    means.sort()
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]
