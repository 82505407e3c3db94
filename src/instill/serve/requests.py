"""The request bodies of /v1/chat/completions and /v1/completions, typed as OpenAI documents
them; a body that does not fit is one 400 that names the field's path, as OpenAI's does.

    raw bytes -> pydantic-core parses the JSON (nesting past 200 levels, numbers past 4300
                 digits, NaN: refused, never a RecursionError) and validates it in one pass
              -> ChatBody / CompletionBody -> conversation() or prompt, gen_params()
              -> InvalidRequest(message, param) for the first field that does not fit, e.g.
                 param "messages[0].role", message "messages[0].role must be one of ..."

Every field is checked here, so nothing a request holds can fail later in the decode thread,
where its row shares a batch with others. Null means absent for every optional field
(`"temperature": null` is greedy, as no temperature is). Fields OpenAI defines and this server
does not use (tools, logprobs, ...) are ignored, as are unknown ones; the limits that depend on
the server (max_tokens, n) come from its ServeConfig, passed as the validation context.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from instill.config import SamplingConfig, ServeConfig, default
from instill.infer.engine import GenParams

# OpenAI's newer clients send `developer` where older ones sent `system`; both are the system turn.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # as OpenAI's API
MAX_STOP_CHARS = 256  # each stop string is matched against the text's tail at every token
SEED = (-(2**63), 2**63 - 1)  # OpenAI's int64; torch's generators take any of them
DEFAULT_MAX_TOKENS = default(SamplingConfig, "max_new_tokens")  # or the server's cap, if lower

# pydantic's error types, said as this server says them (after the field's path)
PHRASES = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "too_short": "must not be empty",
}


class InvalidRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def _refuse(phrase: str) -> PydanticCustomError:
    return PydanticCustomError("instill", "{phrase}", {"phrase": phrase})


def _shown(value) -> str:
    if isinstance(value, int) and value.bit_length() > 128:  # JSON numbers stop at 4300 digits
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value)


def _within(lo, hi, *, integer: bool = False, cap: str | None = None, above: bool = False):
    """A number in [lo, hi] ((lo, hi] when `above`); `cap`: hi is that ServeConfig field."""

    def check(value, info: ValidationInfo):
        if value is None:
            return None
        top = getattr(_config(info), cap) if cap else hi
        if not ((lo < value) if above else (lo <= value)) or not value <= top:
            kind = "an integer" if integer else "a number"
            bounds = f"{'(' if above else '['}{lo}, {top}]"
            raise _refuse(f"must be {kind} in {bounds}, got {_shown(value)}")
        return value

    return AfterValidator(check)


def _config(info: ValidationInfo) -> ServeConfig:
    return (info.context or {}).get("cfg") or ServeConfig()


def _stop(value) -> list[str]:
    """None, a string, or up to MAX_STOP strings; empty strings stop nothing and are dropped."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _refuse("must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise _refuse(f"takes at most {MAX_STOP} strings, got {len(stops)}")
    for i, s in enumerate(stops):
        if len(s) > MAX_STOP_CHARS:
            raise _refuse(
                f"strings must be at most {MAX_STOP_CHARS} characters; stop[{i}] has {len(s)}"
            )
    return [s for s in stops if s]


def _role(value) -> str:
    if not isinstance(value, str) or value not in ROLES:
        raise _refuse(f"must be one of {', '.join(ROLES)}")
    return ROLES[value]


def _content(value) -> list:
    """A string is one text part; else OpenAI's list of parts."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise _refuse("must be a string or a list of text parts")
    return value


def _prompt(value):
    if isinstance(value, list):  # OpenAI also takes a batch of prompts, or token ids
        raise _refuse("must be a string (this server completes one prompt per request)")
    return value


class _Strict(BaseModel):
    # strict: JSON's true is not 1, 2.0 is not an integer, "5" is not a number
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(_Strict):
    type: str
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise _refuse("must be an object with a 'type'")
        if value.get("type") != "text":
            raise _refuse(f"is a {value.get('type')!r} part; this server reads text parts only")
        return value


class Message(_Strict):
    role: Annotated[str, BeforeValidator(_role)]
    content: Annotated[list[TextPart], BeforeValidator(_content)]
    name: str | None = None

    def text(self) -> str:
        return "\n".join(part.text for part in self.content)  # list parts joined by newlines


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Body(_Strict):
    """What both routes take."""

    model: str | None = None
    max_tokens: Annotated[int | None, _within(1, None, integer=True, cap="max_tokens_cap")] = None
    n: Annotated[int | None, _within(1, None, integer=True, cap="max_n")] = None
    temperature: Annotated[float | None, _within(0, 2)] = None
    top_p: Annotated[float | None, _within(0, 1, above=True)] = None
    # not OpenAI's, read as vLLM and llama-server read them
    top_k: Annotated[int | None, _within(0, 100_000, integer=True)] = None
    repetition_penalty: Annotated[float | None, _within(0, 10, above=True)] = None
    # OpenAI's; taken and checked, not applied (repetition_penalty is)
    presence_penalty: Annotated[float | None, _within(-2, 2)] = None
    frequency_penalty: Annotated[float | None, _within(-2, 2)] = None
    seed: Annotated[int | None, _within(*SEED, integer=True)] = None
    stop: Annotated[list[str], BeforeValidator(_stop)] = Field(default_factory=list)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def gen_params(self, cfg: ServeConfig) -> GenParams:
        asked = self._max_tokens()
        default = min(DEFAULT_MAX_TOKENS, cfg.max_tokens_cap)
        return GenParams(
            max_new_tokens=asked if asked is not None else default,
            temperature=0.0 if self.temperature is None else self.temperature,  # greedy
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatBody(_Body):
    messages: Annotated[list[Message], Field(min_length=1)]
    # OpenAI's newer name for max_tokens; max_tokens wins when both are given
    max_completion_tokens: Annotated[
        int | None, _within(1, None, integer=True, cap="max_tokens_cap")
    ] = None

    def _max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionBody(_Body):
    prompt: Annotated[str, BeforeValidator(_prompt)]


def parse(raw: bytes, kind: type[_Body], cfg: ServeConfig) -> _Body:
    """The body, validated, or InvalidRequest naming the first field that does not fit."""
    try:
        return kind.model_validate_json(raw, context={"cfg": cfg})
    except ValidationError as exc:
        raise _invalid(exc.errors(include_url=False, include_input=False)[0]) from None


def _invalid(error: dict) -> InvalidRequest:
    if error["type"] == "json_invalid":
        if "recursion limit" in error["msg"]:
            return InvalidRequest("request body nests arrays or objects too deeply")
        return InvalidRequest(f"request body is not valid JSON ({error['msg']})")
    loc = error["loc"]
    if not loc:  # the body itself: an array, a string...
        return InvalidRequest("request body must be a JSON object")
    path = _path(loc)
    phrase = error["msg"] if error["type"] == "instill" else PHRASES.get(error["type"])
    if phrase is None:
        phrase = f"is not valid: {error['msg']}"
    where = f"'{path}'" if len(loc) == 1 else path  # a top-level name quoted, as OpenAI does
    return InvalidRequest(f"{where} {phrase}", path)


def _path(loc: tuple) -> str:
    """("messages", 0, "role") -> "messages[0].role", OpenAI's way of naming a field."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out
