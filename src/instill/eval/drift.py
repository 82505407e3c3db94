"""General behaviour measured by generation, against the base model (the general_gen suite).

    base model ──► its own greedy replies to the suite's prompts
                     │           (cached, keyed by the weights, the prompts and the settings)
    model M ────► per-token NLL of those replies under M, minus under the base
                     = drift, an estimate of KL(base || M) on general requests
            └───► M's own greedy replies: length against the base's (tokens, share under
                     10 words), ROUGE-L against references where the suite file has them

Choice accuracy cannot see a model that still knows the answers but has stopped writing them out
(one-line replies after tuning on short tasks); these measures can, and they need no references,
so they work for any model and any data. The prompts and the base model's replies to them (the
anchor) come from anchors.py, which also gives `data.replay` its rows (a disjoint split of the same
pool).
"""

from __future__ import annotations

from instill.anchors import Anchor, reply_nll
from instill.data.examples import EvalExample
from instill.models.load import model_digest

SHORT_WORDS = 10  # a reply under this many words is "short" (a one-line answer)

# What counts as a loss in the forgetting verdict (each needs its whole 95% interval past the line):
# replies shorter than LENGTH_FLOOR of the base's or longer than LENGTH_CEILING of them, the share
# of short replies up by more than SHORT_RISE, or drift above DRIFT_LIMIT nats per token. README
# "Forgetting" says why these lines (bench/length_guard.py measures the length ones).
LENGTH_FLOOR = 0.8
LENGTH_CEILING = 1.3  # between models that did not forget and one asked to ramble (README)
SHORT_RISE = 0.10
DRIFT_LIMIT = 0.19  # half the drift of a q4_0 requantization (README "Forgetting")
NO_DROP = "no drop with a 95% interval below 0"


def guard_limits() -> dict:
    """The lines the forgetting verdict draws, by guard (`instill compare --json` carries them)."""
    return {
        "general_choice": NO_DROP,
        "drift_max": DRIFT_LIMIT,
        "length_ratio_min": LENGTH_FLOOR,
        "length_ratio_max": LENGTH_CEILING,
        "short_share_rise_max": SHORT_RISE,
        "rouge_l": NO_DROP,
    }


def limit_cells() -> dict[str, str]:
    """Each generation measure's limit as a table shows it beside the value."""
    return {
        "drift": f"≤ {DRIFT_LIMIT:+g}",
        "tokens": f"x{LENGTH_FLOOR:.2f} to x{LENGTH_CEILING:.2f}",
        "short": f"rise ≤ {100 * SHORT_RISE:g} points",
        "rouge_l": "no significant drop",
    }


# --- scoring a model against the anchor --------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


def drift_records(model, tokenizer, prompts: list[EvalExample], anchor: Anchor, batch_size: int):
    """One record per prompt: the model's reply beside the base's, their lengths, the per-token
    NLL of the base's reply under the model and under the base, and drift (their difference).
    The base model itself (same digest) reuses its cached replies, so its drift is exactly 0."""
    from instill.eval.metrics import rouge_l, text_scores
    from instill.infer import GenParams, generate

    base = [anchor.replies[p.id] for p in prompts]
    if model_digest(model) == anchor.digest:
        texts = [b.text for b in base]
        tokens = [b.tokens for b in base]
        finish = ["stop" if b.ended else "length" for b in base]
        nll = [b.nll for b in base]
    else:
        gens = generate(
            model,
            tokenizer,
            [list(p.prompt) for p in prompts],
            GenParams(max_new_tokens=anchor.max_new_tokens),
            batch_size=batch_size,
        )
        texts = [g.text for g in gens]
        tokens = [g.completion_tokens for g in gens]
        finish = [g.finish_reason for g in gens]
        nll = reply_nll(model, tokenizer, prompts, [b.ids for b in base], max(1, batch_size // 4))
    records = []
    for p, b, text, n_tok, fin, n in zip(prompts, base, texts, tokens, finish, nll, strict=True):
        drift = 0.0 if n is None or b.nll is None else n - b.nll
        scores = {"drift": round(drift, 6), "rouge_l_base": round(rouge_l(text, b.text), 6)}
        refs = [p.reference] if isinstance(p.reference, str) else list(p.reference)
        refs = [r for r in refs if r]
        if refs:
            scores["rouge_l"] = text_scores(text, refs)["rouge_l"]
        records.append(
            {
                "id": p.id,
                "family": p.family,
                "cluster": p.cluster,
                "seen": True,
                "prompt": p.prompt[-1]["content"],
                "prediction": text,
                "base_reply": b.text,
                "reference": refs or None,
                "finish_reason": fin,
                "tokens": n_tok,
                "base_tokens": b.tokens,
                "words": words(text),
                "base_words": words(b.text),
                "nll": None if n is None else round(n, 6),
                "base_nll": None if b.nll is None else round(b.nll, 6),
                "anchor": anchor.digest[:16],
                "score": round(drift, 6),
                "scores": scores,
            }
        )
    return records


def generation_summary(records: list[dict]) -> dict:
    """Drift, length and (where there are references) ROUGE-L of one side's records, with 95%
    intervals; the base side of these records is the anchor's replies."""
    from instill.eval.metrics import bootstrap_ci, bootstrap_delta_ci, bootstrap_ratio_ci

    drift = [r["score"] for r in records]
    toks, base_toks = [r["tokens"] for r in records], [r["base_tokens"] for r in records]
    short = [float(r["words"] < SHORT_WORDS) for r in records]
    base_short = [float(r["base_words"] < SHORT_WORDS) for r in records]
    n = len(records)
    out = {
        "anchor": records[0]["anchor"] if records else None,
        "drift": _stat(sum(drift) / n if n else 0.0, bootstrap_ci(drift)),
        "tokens": round(sum(toks) / n, 3) if n else 0.0,
        "base_tokens": round(sum(base_toks) / n, 3) if n else 0.0,
        "length_ratio": _stat(
            sum(toks) / max(1, sum(base_toks)), bootstrap_ratio_ci(toks, base_toks)
        ),
        "short_share": round(sum(short) / n, 6) if n else 0.0,
        "base_short_share": round(sum(base_short) / n, 6) if n else 0.0,
        "short_delta": _stat(
            (sum(short) - sum(base_short)) / n if n else 0.0,
            bootstrap_delta_ci(base_short, short, paired=True),
        ),
    }
    refs = [r["scores"]["rouge_l"] for r in records if "rouge_l" in r["scores"]]
    if refs:
        out["rouge_l"] = _stat(sum(refs) / len(refs), bootstrap_ci(refs))
    return out


def _stat(value: float, ci) -> dict:
    return {"value": round(value, 6), "ci95": [round(ci[0], 6), round(ci[1], 6)]}


# --- the verdict's lines ------------------------------------------------------------------------


def generation_losses(gen: dict) -> list[str]:
    """The significant losses in a generation_change (eval/compare.py), each as a sentence."""
    losses: list[str] = []
    if not gen["n"]:
        return losses
    d = gen["drift"]
    if d.ci is not None and d.ci[0] > DRIFT_LIMIT:
        losses.append(
            f"drift from the base model {d.delta:+.3f} nats per token (95% CI {d.ci[0]:+.3f} to "
            f"{d.ci[1]:+.3f}), above the {DRIFT_LIMIT} limit"
        )
    ta, tb, ratio, ci = gen["tokens"]
    if ci is not None and ci[1] < LENGTH_FLOOR:
        losses.append(
            f"replies {ratio:.2f}x as long as before ({ta:.1f} -> {tb:.1f} tokens on average, "
            f"95% CI {ci[0]:.2f}x to {ci[1]:.2f}x), below the {LENGTH_FLOOR}x floor"
        )
    if ci is not None and ci[0] > LENGTH_CEILING:  # preference tuning's known failure
        losses.append(
            f"replies {ratio:.2f}x the base's length (limit {LENGTH_CEILING:g}x): longer replies "
            f"({ta:.1f} -> {tb:.1f} tokens on average, 95% CI {ci[0]:.2f}x to {ci[1]:.2f}x)"
        )
    sa, sb, delta, ci = gen["short"]
    if ci is not None and ci[0] > SHORT_RISE:
        losses.append(
            f"replies under {SHORT_WORDS} words {100 * sa:.1f}% -> {100 * sb:.1f}% "
            f"({100 * delta:+.1f} points, 95% CI {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}), a "
            f"rise of more than {100 * SHORT_RISE:.0f} points"
        )
    r = gen["rouge_l"]
    if r is not None and r.significant and r.delta < 0:
        losses.append(
            f"ROUGE-L against the references {100 * r.a:.1f} -> {100 * r.b:.1f} "
            f"({100 * r.delta:+.1f} points, 95% CI {100 * r.ci[0]:+.1f} to {100 * r.ci[1]:+.1f})"
        )
    return losses


def generation_changes(gen: dict) -> list[tuple[str, bool]]:
    """What the verdict must not call "no change", as (sentence, reaches): a measure whose 95%
    interval excludes no change in the bad direction but stays inside its limit (a real change,
    not a loss; reaches False), or whose interval reaches across its limit (neither shown inside
    it nor past it; reaches True). A measure past its limit is a loss (generation_losses)."""
    out: list[tuple[str, bool]] = []
    if not gen["n"]:
        return out
    d = gen["drift"]
    if d.ci is not None and d.ci[0] <= DRIFT_LIMIT < d.ci[1]:
        out.append((f"drift {d.delta:+.3f} nats/token (95% CI {d.ci[0]:+.3f} to "
                    f"{d.ci[1]:+.3f}) reaches past its {DRIFT_LIMIT:+g} limit", True))  # fmt: skip
    elif d.ci is not None and 0 < d.ci[0] <= DRIFT_LIMIT:
        out.append((f"drift {d.delta:+.3f} nats/token (95% CI {d.ci[0]:+.3f} to "
                    f"{d.ci[1]:+.3f}; limit {DRIFT_LIMIT:+g})", False))  # fmt: skip
    _, _, ratio, ci = gen["tokens"]
    if ci is not None:
        shown = f"reply length {ratio:.2f}x the base's (95% CI {ci[0]:.2f}x to {ci[1]:.2f}x"
        if ci[0] < LENGTH_FLOOR <= ci[1] or ci[0] <= LENGTH_CEILING < ci[1]:
            out.append((f"{shown}) reaches past a limit ({LENGTH_FLOOR:g}x to "
                        f"{LENGTH_CEILING:g}x)", True))  # fmt: skip
        elif ci[1] < 1:
            out.append((f"{shown}: shorter; limit {LENGTH_FLOOR:g}x)", False))
        elif ci[0] > 1:
            out.append((f"{shown}: longer; limit {LENGTH_CEILING:g}x)", False))
    _, _, delta, ci = gen["short"]
    if ci is not None:
        shown = (f"replies under {SHORT_WORDS} words {100 * delta:+.1f} points (95% CI "
                 f"{100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}")  # fmt: skip
        if ci[0] <= SHORT_RISE < ci[1]:
            out.append((f"{shown}) reaches past its limit, a rise of {100 * SHORT_RISE:g}", True))
        elif 0 < ci[0] <= SHORT_RISE:
            out.append((f"{shown}; limit a rise of {100 * SHORT_RISE:g})", False))
    return out


def generation_text(gen: dict) -> str:
    """The generation measures in one sentence, whatever they show."""
    if not gen["n"]:
        return "no prompt was answered on both sides"
    d = gen["drift"]
    ta, tb, ratio, ci = gen["tokens"]
    sa, sb, delta, sci = gen["short"]
    text = (
        f"drift {d.delta:+.3f} nats/token (limit {DRIFT_LIMIT:+g}; 95% CI {d.ci[0]:+.3f} to "
        f"{d.ci[1]:+.3f}); reply length {ratio:.2f}x (limits {LENGTH_FLOOR:g}x to "
        f"{LENGTH_CEILING:g}x; {ta:.1f} -> {tb:.1f} tokens, CI {ci[0]:.2f}x to {ci[1]:.2f}x); "
        f"replies under {SHORT_WORDS} words {100 * sa:.1f}% -> {100 * sb:.1f}% (limit a rise of "
        f"{100 * SHORT_RISE:g} points)"
    )
    r = gen["rouge_l"]
    if r is not None:
        text += f"; ROUGE-L against references {100 * r.a:.1f} -> {100 * r.b:.1f}"
    if not gen["same_anchor"]:
        text += " (the two sides were scored against different base models)"
    return text + f"; n={gen['n']}"


def longer_unseen(gen: dict) -> str | None:
    """Why the upper length limit cannot be crossed, when it cannot: the base's replies were cut
    at the generation cap, so even a tuned model writing to the cap on every prompt stays under
    LENGTH_CEILING times the base's length (a longer-replies loss would go unseen)."""
    cut, cap = gen.get("base_cut", (0, None))
    ta = gen["tokens"][0]
    if not gen["n"] or cap is None or not ta:
        return None
    reach = cap / ta
    if reach > LENGTH_CEILING:
        return None
    return (
        f"longer replies cannot be seen: {cut} of {gen['n']} base replies were cut at {cap} "
        f"tokens, so a reply can be at most {reach:.2f}x the base's length, under the "
        f"{LENGTH_CEILING:g}x limit (raise eval.gen_max_new_tokens)"
    )
