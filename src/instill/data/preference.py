"""Preference rows: every preference format -> a pair (prompt, chosen, rejected) or a labelled
completion (prompt, completion, desirable), as messages.

    raw row -> detect_preference_format (from the keys) -> to_preference -> Pair | Labelled
    read_preferences(path)  every row of a file or hub dataset, with file:line errors

Like formats.py for supervised rows, converters never see tokens; data/preference_tokens.py
renders the result through the chat template. A prompt is a conversation that ends on a user
turn; a reply is one or more messages that start and end with an assistant turn (usually one
assistant message).

Formats, detected from the keys of a file's first row:
    pairs               prompt + chosen + rejected, each a string or a message list (TRL's
                        standard and conversational forms); optional shared `system`
    conversation_pairs  chosen + rejected only, each a whole conversation; the prompt is their
                        longest common message prefix, which must end before an assistant turn
    hh                  chosen + rejected as Anthropic HH transcripts ("\\n\\nHuman: ...
                        \\n\\nAssistant: ..."), then as conversation_pairs
    sharegpt_pairs      conversations (the prompt) + chosen + rejected (LLaMA-Factory ranking)
    alpaca_pairs        instruction (+ input) + chosen + rejected (LLaMA-Factory ranking)
    kto                 prompt + completion + label (true: desirable, false: undesirable)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from instill.data.formats import (
    ROLES,
    SHAREGPT_ROLES,
    check_turns,
    instruction_text,
    meta_of,
    parse_messages,
)
from instill.data.sources import RawRow, convert_source
from instill.errors import InstillError

FORMATS = ("pairs", "conversation_pairs", "hh", "sharegpt_pairs", "alpaca_pairs", "kto")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Pair:
    """A prompt and two replies to it, the chosen one preferred over the rejected one."""

    prompt: tuple[dict, ...]
    chosen: tuple[dict, ...]
    rejected: tuple[dict, ...]
    source: str = ""
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Labelled:
    """A prompt and one reply, marked desirable or not (KTO's unpaired data)."""

    prompt: tuple[dict, ...]
    completion: tuple[dict, ...]
    desirable: bool
    source: str = ""
    meta: dict = field(default_factory=dict)


def detect_preference_format(row: dict) -> str:
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "pairs"
        if "conversations" in keys:
            return "sharegpt_pairs"
        if "instruction" in keys:
            return "alpaca_pairs"
        return "hh" if isinstance(row["chosen"], str) else "conversation_pairs"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    supervised = keys & {"messages", "conversations", "completion", "output", "response"}
    hint = (
        "; this looks like a supervised row: a preference objective does not train on those. "
        "Tune on them first (train.objective: sft) and start the preference run from that run "
        "(model.name: runs/NAME), or add a supervised term on the chosen replies "
        "(train.preference.sft_weight)"
        if supervised
        else ""
    )
    raise InstillError(
        f"cannot detect a preference format from keys {sorted(keys)}; expected "
        "prompt+chosen+rejected, chosen+rejected (whole conversations or Human:/Assistant: "
        "transcripts), conversations+chosen+rejected, instruction+chosen+rejected, or "
        f"prompt+completion+label{hint}"
    )


def _messages(row: RawRow, key: str, value: object) -> list[dict]:
    """A message list in OpenAI form (role/content) or ShareGPT form (from/value)."""
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return parse_messages(row, key, value, "from", "value", SHAREGPT_ROLES)
    return parse_messages(row, key, value, "role", "content", {r: r for r in ROLES})


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeio" else f"a {word}"  # roles: a user, an assistant


def _field(row: RawRow, key: str) -> object:
    value = row.data.get(key)
    if value is None:
        raise InstillError(f"{row.where}: missing field '{key}'")
    return value


def _prompt(row: RawRow, key: str, value: object, system: object = None) -> list[dict]:
    """A prompt: a string (one user turn) or messages ending on a user turn, after the row's
    optional `system` text."""
    if isinstance(value, str):
        if not value.strip():
            raise InstillError(f"{row.where}: field '{key}' is empty")
        messages = [{"role": "user", "content": value}]
    else:
        messages = _messages(row, key, value)
        if not messages:
            raise InstillError(f"{row.where}: field '{key}' has no messages")
    if system is not None:
        if not isinstance(system, str):
            raise InstillError(f"{row.where}: field 'system' must be a string")
        if messages[0]["role"] == "system":
            raise InstillError(
                f"{row.where}: both a 'system' field and a system message in '{key}'; keep one"
            )
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
    if messages[-1]["role"] != "user":
        raise InstillError(
            f"{row.where}: field '{key}' ends on {_a(messages[-1]['role'])} turn; a prompt must "
            "end with the user's turn (the replies follow it)"
        )
    return messages


def _reply(row: RawRow, key: str, value: object) -> list[dict]:
    """A reply: a string (one assistant turn), one message, or messages that start and end with
    an assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise InstillError(f"{row.where}: field '{key}' is empty")
        return [{"role": "assistant", "content": value}]
    messages = _messages(row, key, [value] if isinstance(value, dict) else value)
    if not messages:
        raise InstillError(f"{row.where}: field '{key}' is empty")
    if messages[0]["role"] != "assistant":
        raise InstillError(
            f"{row.where}: field '{key}' starts with {_a(messages[0]['role'])} turn; a reply "
            "starts with the assistant's turn (put the conversation before it in the prompt)"
        )
    check_turns(row, messages, key)
    return messages


def _check_differ(row: RawRow, chosen: list[dict], rejected: list[dict]) -> None:
    if chosen == rejected:
        raise InstillError(
            f"{row.where}: 'chosen' and 'rejected' are the same reply, so the pair teaches "
            "nothing; fix the row or drop it"
        )


def _split_shared_prefix(row: RawRow, chosen: list[dict], rejected: list[dict]) -> Pair:
    """Two whole conversations -> a pair whose prompt is their longest common message prefix."""
    _check_differ(row, chosen, rejected)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    ok = (
        0 < n < min(len(chosen), len(rejected))
        and chosen[n]["role"] == rejected[n]["role"] == "assistant"
        and chosen[n - 1]["role"] == "user"
    )
    if not ok:
        raise InstillError(
            f"{row.where}: 'chosen' and 'rejected' do not share a prompt: their common "
            f"messages ({n}) must end on a user turn, each followed by a different assistant "
            "reply; give the prompt separately in a 'prompt' field"
        )
    check_turns(row, chosen, "chosen")
    check_turns(row, rejected, "rejected")
    return Pair(tuple(chosen[:n]), tuple(chosen[n:]), tuple(rejected[n:]), row.where, meta_of(row))


def hh_messages(row: RawRow, key: str) -> list[dict]:
    """An Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages."""
    text = _field(row, key)
    if not isinstance(text, str):
        raise InstillError(f"{row.where}: field '{key}' must be a string transcript")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise InstillError(
            f"{row.where}: field '{key}' is not a Human:/Assistant: transcript; each turn "
            'must start with "\\n\\nHuman:" or "\\n\\nAssistant:"'
        )
    roles, texts = parts[1::2], parts[2::2]
    return [{"role": _HH_ROLES[r], "content": t.strip()} for r, t in zip(roles, texts, strict=True)]


def _pair(row: RawRow, prompt: list[dict]) -> Pair:
    chosen = _reply(row, "chosen", _field(row, "chosen"))
    rejected = _reply(row, "rejected", _field(row, "rejected"))
    _check_differ(row, chosen, rejected)
    return Pair(tuple(prompt), tuple(chosen), tuple(rejected), row.where, meta_of(row))


def to_preference(row: RawRow, fmt: str) -> Pair | Labelled:
    """Convert one raw row of preference format `fmt` (see the module docstring)."""
    system = row.data.get("system")
    if fmt == "pairs":
        return _pair(row, _prompt(row, "prompt", _field(row, "prompt"), system))
    if fmt == "sharegpt_pairs":
        return _pair(row, _prompt(row, "conversations", _field(row, "conversations"), system))
    if fmt == "alpaca_pairs":
        instruction = _field(row, "instruction")
        extra = row.data.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise InstillError(f"{row.where}: fields 'instruction' and 'input' must be strings")
        return _pair(row, _prompt(row, "instruction", instruction_text(instruction, extra), system))
    if fmt == "conversation_pairs":
        chosen = _messages(row, "chosen", _field(row, "chosen"))
        rejected = _messages(row, "rejected", _field(row, "rejected"))
        return _split_shared_prefix(row, chosen, rejected)
    if fmt == "hh":
        return _split_shared_prefix(row, hh_messages(row, "chosen"), hh_messages(row, "rejected"))
    if fmt == "kto":
        label = row.data.get("label")
        if not isinstance(label, bool):
            raise InstillError(
                f"{row.where}: field 'label' must be true (desirable) or false (undesirable), "
                f"got {label!r}"
            )
        prompt = _prompt(row, "prompt", _field(row, "prompt"), system)
        completion = _reply(row, "completion", _field(row, "completion"))
        return Labelled(tuple(prompt), tuple(completion), label, row.where, meta_of(row))
    raise InstillError(
        f"{row.where}: unknown preference format '{fmt}'; expected one of {', '.join(FORMATS)}"
    )


def read_preferences(
    path: str,
    fmt: str = "auto",
    split: str = "train",
    skipped: list[dict] | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[Pair | Labelled], str]:
    """Every preference row of one source and its format (detected from the first row when
    `fmt` is "auto"). With `skipped`, bad rows are recorded there ({"where", "reason"}) instead
    of raised; `columns` renames a row's keys (old -> new) before its format is detected."""
    return convert_source(
        path, fmt, split, skipped, columns, detect_preference_format,
        lambda raw, f: [to_preference(raw, f)],
    )  # fmt: skip


def unpaired(pairs: list[Pair]) -> list[Labelled]:
    """Each pair as two labelled completions (its chosen reply desirable, its rejected one
    not), as KTO is trained from pair data."""
    out = []
    for p in pairs:
        out.append(Labelled(p.prompt, p.chosen, True, p.source, p.meta))
        out.append(Labelled(p.prompt, p.rejected, False, p.source, p.meta))
    return out
