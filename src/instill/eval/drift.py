"""General behaviour measured by generation, against the base model (the general_gen suite).

    base model ──► its own greedy replies to the suite's prompts
                     │           (cached, keyed by the weights, the prompts and the settings)
    model M ────► per-token NLL of those replies under M, minus under the base
                     = drift, an estimate of KL(base || M) on general requests
            └───► M's own greedy replies: length against the base's (tokens, share under
                     10 words), ROUGE-L against references where the suite file has them

Choice accuracy cannot see a model that still knows the answers but has stopped writing them out
(one-line replies after tuning on short tasks); these measures can, and they need no references,
so they work for any model and any data. The same base replies, generated for a disjoint split of
the prompt pool, are the rows of `data.replay` (self-distillation replay).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from instill.atomic import WriteError, atomic_file
from instill.data.examples import EvalExample
from instill.data.formats import instruction_text
from instill.errors import InstillError
from instill.jsonl import read_jsonl, write_jsonl
from instill.models.load import model_digest

OPEN_FILE = Path(__file__).parent / "suite_files" / "open_prompts.jsonl"
GEN_SUITE = "general_gen"
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


def _prompt_id(messages) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:12]


def shipped_prompts(split: str) -> list[EvalExample]:
    """The prompt pool shipped with instill: split "eval" (the general_gen suite) or "replay"
    (disjoint prompts whose base replies data.replay trains on)."""
    out = []
    for i, row in enumerate(read_jsonl(OPEN_FILE), 1):
        if row["split"] == split:
            msgs = ({"role": "user", "content": row["prompt"]},)
            out.append(
                EvalExample(
                    row["id"], msgs, "", row["kind"], row["kind"], source=f"{OPEN_FILE.name}:{i}"
                )
            )
    return out


def _row_prompt(data: dict) -> list[dict] | None:
    """The prompt of one row: a prompt or instruction field, or messages ending on the user's
    turn (a trailing assistant reply is dropped: the model writes its own)."""
    if isinstance(data.get("prompt"), str) and data["prompt"].strip():
        return [{"role": "user", "content": data["prompt"]}]
    if isinstance(data.get("instruction"), str) and data["instruction"].strip():
        extra = str(data.get("input") or "").strip()
        return [{"role": "user", "content": instruction_text(data["instruction"], extra)}]
    msgs = data.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        ok = all(isinstance(m.get("content"), str) and m.get("role") for m in msgs)
        if msgs and ok and msgs[-1].get("role") == "user":
            return [{"role": m["role"], "content": m["content"]} for m in msgs]
    return None


def prompt_file(path: str | Path, key: str) -> list[EvalExample]:
    """Prompts of a user's file (JSONL, JSON, CSV, Parquet): each row a `prompt`, an
    `instruction` (+ `input`), or `messages` ending with the user's turn; optional `reference` or
    `references` for ROUGE-L. `key` names the setting in errors."""
    from instill.data.sources import read_source

    if not Path(path).expanduser().exists():
        raise InstillError(f"{key}: file not found: {path}")
    out: list[EvalExample] = []
    ids: set[str] = set()
    for raw in read_source(str(path), "train", None):
        msgs = _row_prompt(raw.data)
        if msgs is None:
            raise InstillError(
                f"{raw.where}: no prompt ({key}); give each row a 'prompt' (or 'instruction', or "
                "'messages' ending with the user's turn)"
            )
        refs = raw.data.get("references", raw.data.get("reference"))
        if refs is not None:
            refs = (refs,) if isinstance(refs, str) else refs
            if not isinstance(refs, list | tuple) or not refs:
                raise InstillError(f"{raw.where}: 'references' must be a list of strings ({key})")
            if not all(isinstance(r, str) for r in refs):
                raise InstillError(f"{raw.where}: 'references' must be a list of strings ({key})")
            refs = tuple(refs)
        kind = str(raw.data.get("kind") or raw.data.get("cluster") or raw.data.get("task") or "")
        pid, k = _prompt_id(msgs), 1
        while pid in ids:  # the same prompt twice: still two examples, each with a stable id
            pid, k = f"{_prompt_id(msgs)}-{k + 1}", k + 1
        ids.add(pid)
        out.append(EvalExample(pid, tuple(msgs), refs or "", kind, kind, source=raw.where))
    if not out:
        raise InstillError(f"{path}: the file holds no prompts ({key})")
    return out


def prompt_text(messages) -> str:
    """A prompt as compared across files: each turn's role and its text, case and spacing
    normalised (the same request written twice is one prompt)."""
    turns = (f"{m['role']}: {' '.join(str(m['content']).split()).casefold()}" for m in messages)
    return "\n".join(turns)


def check_replay_overlap(replay: list[EvalExample], replay_file: str, suites) -> None:
    """Replay trains on the base model's replies to its prompts; a forgetting guard that scores
    the same prompts would then measure rehearsal, biased toward "no forgetting". `suites` is
    (name, examples) of every guard; any shared prompt is refused, naming both sides."""
    rehearsed = {prompt_text(p.prompt) for p in replay}
    for name, examples in suites:
        shared = {prompt_text(ex.prompt) for ex in examples} & rehearsed
        if shared:
            raise InstillError(
                f"data.replay.prompts: {len(shared)} prompt(s) of {replay_file} are also prompts "
                f"of the {name} suite, which measures forgetting; replay would rehearse them and "
                "bias that guard toward no forgetting. Remove the shared prompts from one of "
                f"the two (or {name} from eval.suites)"
            )


# --- the base model's replies, cached ----------------------------------------------------------


@dataclass(frozen=True)
class BaseReply:
    text: str
    tokens: int  # generated tokens, end-of-turn excluded
    ended: bool  # the model ended the reply (False: cut at max_new_tokens)
    nll: float | None  # mean NLL per token of the reply under the model that wrote it
    ids: tuple[int, ...] = ()  # the tokens it generated, with the end-of-turn one if it ended


@dataclass(frozen=True)
class Anchor:
    """The base model's replies to a set of prompts (by prompt id) and that model's digest."""

    digest: str
    max_new_tokens: int
    replies: dict[str, BaseReply]


def _cache_file(digest: str, tokenizer, max_new_tokens: int) -> Path:
    from instill.home import instill_home

    template = getattr(tokenizer, "chat_template", "") or ""
    settings = json.dumps(
        {"v": 2, "greedy": True, "max_new_tokens": max_new_tokens, "template": template}
    )
    key = hashlib.sha256(f"{digest}\x1f{settings}".encode()).hexdigest()[:24]
    return instill_home() / "base-replies" / f"{key}.jsonl"


def _read_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    fields = {"key", "text", "tokens", "ended", "nll", "ids"}
    try:  # a damaged cache, or an entry missing a field, is generated again
        return {r["key"]: r for r in read_jsonl(path) if isinstance(r, dict) and fields <= set(r)}
    except InstillError:
        return {}


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    with atomic_file(path, "base-reply cache", "INSTILL_HOME") as tmp:
        write_jsonl(tmp, entries.values())


def _entry_key(prompt: EvalExample) -> str:
    return hashlib.sha256(json.dumps(list(prompt.prompt), sort_keys=True).encode()).hexdigest()


def reply_nll(model, tokenizer, prompts, replies: list[tuple[int, ...]], batch_size: int):
    """Mean NLL per token of each reply's token ids (as generated: with the end-of-turn token
    when the model ended it) after its chat-templated prompt. Token ids, not text: re-encoding
    a generated text need not give back the tokens generated, nor render prefix-stably."""
    from instill.data.render import render_prompt
    from instill.eval.likelihood import masked_logprobs

    rows = []
    for p, ids in zip(prompts, replies, strict=True):
        head = render_prompt(tokenizer, list(p.prompt))
        rows.append((head + list(ids), [0] * len(head) + [1] * len(ids)))
    scores = masked_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
    return [-s.logprob / s.tokens if s.tokens else None for s in scores]


def base_replies(
    model,
    tokenizer,
    prompts: list[EvalExample],
    max_new_tokens: int,
    batch_size: int = 32,
    *,
    digest: str | None = None,
    cache: bool = True,
) -> Anchor:
    """The model's greedy replies to `prompts`, each with its NLL under the model: read from the
    cache under $INSTILL_HOME/base-replies (keyed by the weights' digest, the chat template and
    the generation settings; one entry per prompt), generating only what is missing."""
    from rich.markup import escape

    from instill.console import console
    from instill.infer import GenParams, generate

    digest = digest or model_digest(model)
    path = _cache_file(digest, tokenizer, max_new_tokens)
    entries = _read_cache(path) if cache else {}
    missing = [p for p in prompts if _entry_key(p) not in entries]
    if missing:
        console.print(
            f"base model: replies to {len(missing)} general prompts (once; cached in "
            f"{path.parent})..."
        )
        was_training = model.training
        model.eval()
        try:
            gens = generate(
                model,
                tokenizer,
                [list(p.prompt) for p in missing],
                GenParams(max_new_tokens=max_new_tokens),
                batch_size=batch_size,
            )
            nll = reply_nll(
                model, tokenizer, missing, [g.token_ids for g in gens], max(1, batch_size // 4)
            )
        finally:
            model.train(was_training)
        for p, g, n in zip(missing, gens, nll, strict=True):
            entries[_entry_key(p)] = {
                "key": _entry_key(p),
                "text": g.text,
                "tokens": g.completion_tokens,
                "ended": g.finish_reason == "stop",
                "nll": n,
                "ids": list(g.token_ids),
            }
        if cache:
            try:
                _write_cache(path, entries)
            except WriteError as exc:  # the cache only saves time: go on without it
                console.print(
                    f"[yellow]base replies not cached[/yellow]: {escape(str(exc))}", soft_wrap=True
                )
    replies = {}
    for p in prompts:
        e = entries[_entry_key(p)]
        replies[p.id] = BaseReply(
            e["text"], int(e["tokens"]), bool(e["ended"]), e["nll"], tuple(e["ids"])
        )
    return Anchor(digest, max_new_tokens, replies)


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
