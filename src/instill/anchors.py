"""The anchors: prompts with the base model's own replies to them, for the two users of both.

    the open prompt pool (eval/suite_files/open_prompts.jsonl, split "eval" or "replay"), or a
    user's prompt file ──► EvalExample prompts
                             │
    base model ──► its greedy replies, each with its NLL under the base (BaseReply), cached under
                   $INSTILL_HOME/base-replies, keyed by the weights, the template and the settings
                             │
                             ├──► eval/drift.py: a drift suite (general_gen) scores a model
                             │    against them
                             └──► data.replay (recipe.py, data/dataset.py): the replies become
                                  training rows (self-distillation replay)

A floor of its own, below eval and above the engines: evaluation and the recipe's replay both
import it, and it imports only infer's generation, train/loss.py's per-row scoring and the
building blocks (tests/test_structure.py keeps it so).
`check_replay_overlap` keeps the two apart: a guard never scores a prompt that replay rehearses.
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

OPEN_FILE = Path(__file__).parent / "eval" / "suite_files" / "open_prompts.jsonl"


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
    nll: float | None  # mean NLL per token of the reply under the model that wrote it (taken
    # while decoding it, or by reply_nll for a cached reply made without it: the two agree to
    # ~1e-5 nats per token, tests/test_drift.py and tests/test_engine.py)
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
    fields = {"key", "text", "tokens", "ended", "ids"}  # "nll" once a caller asked for it
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
    from instill.train.loss import masked_logprobs

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
    nll: bool = True,
) -> Anchor:
    """The model's greedy replies to `prompts`, each with its NLL under the model (`nll`: what a
    drift suite needs, summed while decoding; replay rows need only the replies):
    read from the cache under $INSTILL_HOME/base-replies (keyed by the weights' digest, the chat
    template and the generation settings; one entry per prompt), generating only what is
    missing, and scoring a cached reply that has no NLL yet when one is asked for."""
    from rich.markup import escape

    from instill.console import console
    from instill.infer import GenParams, generate

    digest = digest or model_digest(model)
    path = _cache_file(digest, tokenizer, max_new_tokens)
    entries = _read_cache(path) if cache else {}
    missing = [p for p in prompts if _entry_key(p) not in entries]
    was_training = model.training
    if missing:
        console.print(
            f"base model: replies to {len(missing)} general prompts (once; cached in "
            f"{path.parent})..."
        )
        model.eval()
        try:
            gens = generate(
                model,
                tokenizer,
                [list(p.prompt) for p in missing],
                GenParams(max_new_tokens=max_new_tokens),
                batch_size=batch_size,
                logprobs=nll,  # scored while decoding: no second pass over the replies
            )
        finally:
            model.train(was_training)
        for p, g in zip(missing, gens, strict=True):
            entries[_entry_key(p)] = {
                "key": _entry_key(p),
                "text": g.text,
                "tokens": g.completion_tokens,
                "ended": g.finish_reason == "stop",
                "ids": list(g.token_ids),
            }
            if nll and g.logprob is not None and g.token_ids:
                entries[_entry_key(p)]["nll"] = -g.logprob / len(g.token_ids)
    unscored = list(
        {_entry_key(p): p for p in prompts if nll and "nll" not in entries[_entry_key(p)]}.values()
    )
    if unscored:
        model.eval()
        try:
            scores = reply_nll(
                model,
                tokenizer,
                unscored,
                [tuple(entries[_entry_key(p)]["ids"]) for p in unscored],
                max(1, batch_size // 4),
            )
        finally:
            model.train(was_training)
        for p, n in zip(unscored, scores, strict=True):
            entries[_entry_key(p)]["nll"] = n
    if cache and (missing or unscored):
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
            e["text"], int(e["tokens"]), bool(e["ended"]), e.get("nll"), tuple(e["ids"])
        )
    return Anchor(digest, max_new_tokens, replies)
