"""Messages -> (input_ids, loss mask) through the tokenizer's own chat template.

The template is the single source of truth for training, evaluation, chat and serving
(transformers renders it in a sandboxed Jinja environment). The loss mask is built by rendering
message prefixes and taking the difference, so it is right for any template without knowing its
markers. Each prefix must tokenise to a prefix of the whole conversation's tokens; if a template
rewrites earlier turns (some hide past reasoning), we fail loudly instead of training on a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from jinja2 import TemplateError

from instill.errors import InstillError

# End-of-turn markers used by common chat templates, besides the tokenizer's eos token.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


class MaskPolicy(StrEnum):
    ASSISTANT = "assistant"  # every assistant reply
    LAST_ASSISTANT = "last_assistant"  # only the final reply
    ALL = "all"  # every token


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos plus the template's known end-of-turn tokens."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for tok in _END_OF_TURN:
        tid = vocab.get(tok)
        if tid is not None and tid not in ids and tok in tokenizer.all_special_tokens:
            ids.append(tid)
    return ids


def load_chat_template(path: str | Path, setting: str = "model.chat_template") -> str:
    """The text of a Jinja chat template file; errors name `setting` (model.chat_template in a
    recipe, --chat-template on the command line)."""
    path = Path(path)
    if not path.is_file():
        raise InstillError(f"{setting}: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InstillError(f"{setting}: {path} is empty")
    return text


def render_text(tokenizer, messages: Sequence[dict], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # The template writes any BOS itself, so the tokenizer must not add another.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _trained_turns(messages: Sequence[dict], policy: MaskPolicy) -> list[int]:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if policy == MaskPolicy.LAST_ASSISTANT:
        return turns[-1:]
    return turns


def render_batch(
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    policy: MaskPolicy | str,
    *,
    where: Sequence[str] | None = None,
    errors: list[tuple[int, str]] | None = None,
) -> list[tuple[list[int], list[int]] | None]:
    """Render many conversations; returns (input_ids, mask) per conversation, mask 1 = trained.

    A trained assistant span is everything the template adds after the generation prompt up to
    and including the end-of-turn token; what the template writes after that token (a newline)
    is not trained, since generation stops at the token.

    `where` names each conversation (file:line) in error messages. With `errors`, a
    conversation the template refuses is recorded there as (index, message) and its result is
    None; without it, the first such conversation raises InstillError.
    """
    policy = MaskPolicy(policy)
    texts: list[str] = []
    plan: list[tuple[int, list[tuple[int, int, int]]] | None] = []  # (full, [(turn, pre, upto)])

    def fail(i: int, message: str) -> None:
        name = where[i] if where is not None else f"conversation {i}"
        if errors is None:
            raise InstillError(f"{name}: {message}")
        errors.append((i, f"{name}: {message}"))

    for i, messages in enumerate(conversations):
        try:
            these = [render_text(tokenizer, messages)]
            spans = []
            if policy != MaskPolicy.ALL:
                for turn in _trained_turns(messages, policy):
                    pre = len(texts) + len(these)
                    these.append(render_text(tokenizer, messages[:turn], generation_prompt=True))
                    upto = render_text(tokenizer, messages[: turn + 1])
                    if upto == these[0]:  # the last reply: same text as the whole conversation
                        spans.append((turn, pre, len(texts)))
                    else:
                        spans.append((turn, pre, len(texts) + len(these)))
                        these.append(upto)
        except TemplateError as exc:
            fail(
                i,
                f"the chat template refused this conversation ({exc}); fix the row or "
                "supply a template that accepts it (model.chat_template)",
            )
            plan.append(None)
            continue
        plan.append((len(texts), spans))
        texts.extend(these)
    encoded = _encode(tokenizer, texts)
    eot = set(end_of_turn_ids(tokenizer))
    results = []
    for i, item in enumerate(plan):
        if item is None:
            results.append(None)
            continue
        full, spans = item
        ids = encoded[full]
        if policy == MaskPolicy.ALL:
            results.append((ids, [1] * len(ids)))
            continue
        mask = [0] * len(ids)
        for turn, pre_i, upto_i in spans:
            pre, upto = encoded[pre_i], encoded[upto_i]
            if ids[: len(pre)] != pre or ids[: len(upto)] != upto:
                fail(
                    i,
                    f"chat template is not prefix-stable at message {turn}: rendering the "
                    "conversation up to that reply gives different tokens than the same part "
                    "of the whole conversation, so the loss mask cannot be derived; supply a "
                    "template that renders earlier turns unchanged (model.chat_template)",
                )
                mask = None
                break
            end = len(upto)
            for j in range(len(pre), len(upto)):
                if ids[j] in eot:
                    end = j + 1  # train through the first end-of-turn token of the reply
                    break
            for j in range(len(pre), end):
                mask[j] = 1
        results.append((ids, mask) if mask is not None else None)
    return results


def render(tokenizer, messages: Sequence[dict], policy: MaskPolicy | str = "assistant"):
    """One conversation -> (input_ids, mask)."""
    return render_batch(tokenizer, [messages], policy)[0]


def render_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (for inference)."""
    return render_prompts(tokenizer, [messages])[0]


def render_prompts(
    tokenizer, conversations: Sequence[Sequence[dict]], errors: list[tuple[int, str]] | None = None
) -> list[list[int] | None]:
    """render_prompt for many conversations, tokenised in one call. With `errors`, one the
    template refuses is recorded there as (index, reason) and its result is None; without it,
    the template's error is raised."""
    texts: list[str | None] = []
    for i, messages in enumerate(conversations):
        try:
            texts.append(render_text(tokenizer, messages, generation_prompt=True))
        except TemplateError as exc:
            if errors is None:
                raise
            errors.append((i, f"the chat template refused this prompt ({exc})"))
            texts.append(None)
    encoded = iter(_encode(tokenizer, [t for t in texts if t is not None]))
    return [None if t is None else next(encoded) for t in texts]
