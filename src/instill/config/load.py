"""YAML + dotted command-line overrides -> one validated, frozen Recipe."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from instill.config.schema import Recipe
from instill.errors import InstillError


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (`X`, `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def _keys_at(path: tuple[str | int, ...]) -> list[str]:
    """Valid keys of the section a dotted path points into."""
    model: type[BaseModel] = Recipe
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        inner = _section_model(field.annotation)
        if inner is None:
            args = typing.get_args(field.annotation)
            inner = next((m for a in args if (m := _section_model(a))), None)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _explain(err: dict[str, Any], where: str) -> str:
    loc = tuple(err["loc"])
    key = _dotted(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        valid = _keys_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{_dotted(loc[:-1] + (close[0],))}'?)" if close else ""
        return f"{where}: unknown key '{key}'{hint}; valid keys here: {', '.join(valid)}"
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"{where}: {key}: {err['msg']}{shown}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise InstillError(f"override '{text}' is not key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise InstillError(f"override '{text}': empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise InstillError(f"override '{text}': value is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each dotted override set (the input is not mutated)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise InstillError(f"override '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InstillError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise InstillError(f"{path}:{line} is not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise InstillError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InstillError(f"{path}: a recipe is a YAML mapping of sections (model:, data:, ...)")
    return data


def build_recipe(data: dict[str, Any], where: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [_explain(e, where) for e in errors[:5]]
        if len(errors) > 5:
            lines.append(f"... and {len(errors) - 5} more")
        raise InstillError("\n".join(lines)) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (or the defaults when `path` is None) and apply dotted overrides."""
    data = read_yaml(Path(path)) if path is not None else {}
    where = str(path) if path is not None else "recipe"
    if overrides:
        data = apply_overrides(data, overrides)
        where += " (with overrides)"
    return build_recipe(data, where)


def yaml_text(value: Any) -> str:
    """A value as a recipe spells it (null, false, [builtin], 0.001), for help text."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000)
    return text.strip().removesuffix("...").strip()  # a plain scalar's document-end marker


def allowed_values(annotation: Any) -> tuple[str, ...]:
    """The values a Literal field (or `Literal[...] | None`) allows; () for any other field."""
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(yaml_text(v) for v in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(annotation) for v in allowed_values(a))
    return ()


def _entry_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a list's entries can be (`list[X]`, `list[str | X]`), if any."""
    if typing.get_origin(annotation) is not list:
        return None
    return next((m for a in typing.get_args(annotation) if (m := _section_model(a))), None)


def _can_be_off(annotation: Any) -> bool:
    """Whether a section field also takes null (`X | None`): a section a recipe may leave off."""
    return type(None) in typing.get_args(annotation)


def iter_fields(model: type[BaseModel] = Recipe, prefix: str = "", values: Any = None):
    """Yield (dotted key, allowed values, value text, description) for every field, sections
    included: the value is the one in `values` (a recipe, or one of its sections) where given,
    else the field's default (a section's default object, so `data.builtin` reads as the
    recipe gets it); "required" (None) for a key that has none. A section that may be null
    (data.replay) gets a line of its own before its keys, and a list of sections (data.sources)
    its entries' keys after it, as `data.sources[].path`, with the entries' defaults."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        desc = field.description or ""
        if values is not None:
            value = getattr(values, name)
        elif field.is_required():
            value = None
        else:
            value = field.get_default(call_default_factory=True)
        inner = _section_model(field.annotation)
        if inner is not None and inner is not model:
            if _can_be_off(field.annotation):
                yield key, (), yaml_text(value), desc
            yield from iter_fields(inner, key + ".", value if isinstance(value, inner) else None)
            continue
        required = values is None and field.is_required()
        allowed = allowed_values(field.annotation)
        yield key, allowed, None if required else yaml_text(value), desc
        entry = _entry_model(field.annotation)
        if entry is not None:
            yield from iter_fields(entry, key + "[].")


def recipe_help(recipe: Recipe | None = None, title: str | None = None) -> str:
    """The recipe reference of `instill train --help` (the schema's defaults) or, given a recipe,
    of the command that runs it (`instill quickstart --help`: the quickstart's values), built
    from the field descriptions."""
    heading = title or (
        "Recipe keys (set in YAML or as key=value overrides), with the defaults a recipe gets "
        "for the keys it leaves out:"
    )
    lines = [heading, ""]
    for key, allowed, value, desc in iter_fields(values=recipe):
        shown = "required" if value is None else f"default: {value}"
        if allowed:
            shown += f"; one of: {', '.join(allowed)}"
        lines.append(f"  {key} [{shown}]: {desc}")
    return "\n\n".join(lines)
