"""Every input format -> one intermediate form: a list of messages plus metadata.

Converters never see tokens; the tokenizer never sees raw columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from instill.data.sources import RawRow
from instill.errors import InstillError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    source: str = ""
    meta: dict = field(default_factory=dict)  # task, cluster, ...


def detect_format(row: dict) -> str:
    """The supervised format of a row, from its keys. A preference row (data/preference.py) is
    refused rather than read as a supervised one: `prompt`+`completion`+`label` would otherwise
    train on the undesirable completions too."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        raise InstillError(
            "this row is a preference pair (chosen and rejected replies), not a supervised "
            "example; to tune on the preference, set train.objective: dpo (or simpo, orpo, "
            "kto); to tune on the chosen replies alone, rename them with the source's columns "
            "(e.g. {chosen: completion}) and drop 'rejected'"
        )
    if {"prompt", "completion"} <= keys and isinstance(row.get("label"), bool):
        raise InstillError(
            "this row is a labelled completion (prompt, completion, label true/false), not a "
            "supervised example: supervised tuning would learn the undesirable completions "
            "too; keep only the rows labelled true and drop the 'label' key"
        )
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "instances" in keys:
        return "selfinstruct"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise InstillError(
        f"cannot detect the data format from keys {sorted(keys)}; expected messages, "
        "conversations, instruction+output, instruction+instances, prompt+completion or text "
        "(or set format: in the source)"
    )


def _str(row: RawRow, key: str, *, allow_empty: bool = False) -> str:
    if key not in row.data or row.data[key] is None:
        raise InstillError(f"{row.where}: missing field '{key}'")
    value = row.data[key]
    if not isinstance(value, str):
        raise InstillError(
            f"{row.where}: field '{key}' must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise InstillError(f"{row.where}: field '{key}' is empty")
    return value


def meta_of(row: RawRow) -> dict:
    return {k: row.data[k] for k in ("task", "cluster", "dataset", "template") if k in row.data}


def check_turns(row: RawRow, messages: list[dict], key: str) -> None:
    if not messages:
        raise InstillError(f"{row.where}: field '{key}' has no messages")
    if messages[-1]["role"] != "assistant":
        raise InstillError(
            f"{row.where}: field '{key}': the conversation ends on a {messages[-1]['role']} turn; "
            "it must end with an assistant reply"
        )
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise InstillError(f"{row.where}: field '{key}' message {i}: empty assistant reply")


def instruction_text(instruction: str, extra: object = None) -> str:
    """The user turn of an instruction row (Alpaca, Self-Instruct): the instruction, then its
    input after a blank line when there is one."""
    extra = extra or ""
    return f"{instruction}\n\n{extra}" if str(extra).strip() else instruction


def parse_messages(
    row: RawRow, key: str, turns: object, role_key: str, content_key: str, roles: dict
) -> list[dict]:
    """A field holding a list of messages -> [{"role", "content"}], roles mapped through
    `roles`; errors name the row, the field and the message."""
    if not isinstance(turns, list):
        raise InstillError(f"{row.where}: field '{key}' must be a list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InstillError(f"{row.where}: field '{key}' message {i} must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise InstillError(
                f"{row.where}: field '{key}' message {i}: unknown role {role!r}; "
                f"expected one of {sorted(roles)}"
            )
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise InstillError(
                f"{row.where}: field '{key}' message {i}: '{content_key}' must be a string"
            )
        messages.append({"role": roles[role], "content": content})
    return messages


def _chat(row: RawRow, key: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    messages = parse_messages(row, key, row.data[key], role_key, content_key, roles)
    check_turns(row, messages, key)
    return messages


def to_conversations(row: RawRow, fmt: str) -> list[Conversation]:
    """Convert one raw row (one row may hold several examples: Self-Instruct instances)."""
    src, meta = row.where, meta_of(row)
    if fmt == "messages":
        msgs = _chat(row, "messages", "role", "content", {r: r for r in ROLES})
        return [Conversation(tuple(msgs), src, meta)]
    if fmt == "sharegpt":
        return [
            Conversation(
                tuple(_chat(row, "conversations", "from", "value", SHAREGPT_ROLES)), src, meta
            )
        ]
    if fmt == "alpaca":
        instruction = _str(row, "instruction")
        extra = _str(row, "input", allow_empty=True) if row.data.get("input") is not None else ""
        user = instruction_text(instruction, extra)
        msgs = (
            {"role": "user", "content": user},
            {"role": "assistant", "content": _str(row, "output")},
        )
        return [Conversation(msgs, src, meta)]
    if fmt == "prompt_completion":
        msgs = (
            {"role": "user", "content": _str(row, "prompt")},
            {"role": "assistant", "content": _str(row, "completion")},
        )
        return [Conversation(msgs, src, meta)]
    if fmt == "selfinstruct":
        instruction = _str(row, "instruction")
        instances = row.data.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InstillError(f"{row.where}: field 'instances' must be a non-empty list")
        out = []
        task = {"task": row.data.get("name", row.data.get("id", "")), **meta}
        for i, inst in enumerate(instances):
            if (
                not isinstance(inst, dict)
                or not isinstance(inst.get("output"), str)
                or not inst["output"].strip()
            ):
                raise InstillError(
                    f"{row.where}: field 'instances' item {i}: needs a non-empty 'output'"
                )
            extra = inst.get("input") or ""
            if not isinstance(extra, str):
                raise InstillError(
                    f"{row.where}: field 'instances' item {i}: 'input' must be a string"
                )
            user = instruction_text(instruction, extra)
            out.append(
                Conversation(
                    (
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": inst["output"]},
                    ),
                    f"{src}#{i}",
                    task,
                )
            )
        return out
    if fmt == "text":
        # Plain text for continued pretraining: one assistant-free "message" trained everywhere.
        return [Conversation(({"role": "text", "content": _str(row, "text")},), src, meta)]
    raise InstillError(f"{row.where}: unknown format '{fmt}'")
