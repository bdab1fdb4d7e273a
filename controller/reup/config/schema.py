"""The typed-schema machinery shared by reup_toml.py and fleet_toml.py (pydantic v2).

`Section` is the base of every table of both files: unknown keys are refused, values are checked
strictly (`port = "22"` is an error, not 22) and models are frozen. `validate` reads a TOML table
into a model and turns every validation problem into one line of a `ConfigError`, worded for the
person who wrote the file: the key's dotted path, what was expected and what was found, and for an
unknown key the closest known key ("did you mean `host`?").
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from reup.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """A table of a configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def load_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def validate(model: type[M], data: Any, where: str, prefix: Sequence[str | int] = ()) -> M:
    """`data` as a `model`, or a ConfigError with one line per problem (`where` names the file)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(model, where, (*prefix, *e["loc"]), len(prefix), e) for e in exc.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def _dotted(loc: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in loc)


def _describe(model: type[BaseModel], where: str, loc: tuple[str | int, ...], skip: int,
              e: Any) -> str:
    kind, value, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    path = _dotted(loc)
    head = f"{where}: {path}" if path else where
    if kind == "missing":
        parent = _dotted(loc[:-1])
        return f"{where}: {parent + ': ' if parent else ''}missing required key '{loc[-1]}'"
    if kind == "extra_forbidden":
        parent = _dotted(loc[:-1])
        known = _fields_at(model, loc[skip:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"{where}: {parent + ': ' if parent else ''}unknown key: {loc[-1]}{hint}"
    got = f", got {value!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"{head}: must be {op} {bound}{got}"
    expected = {
        "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
        "string_type": "a string", "bool_type": "true or false", "list_type": "a list",
        "tuple_type": "a list", "dict_type": "a table", "model_type": "a table",
        "model_attributes_type": "a table", "finite_number": "a finite number",
    }.get(kind)
    if expected:
        return f"{head}: expected {expected}{got}"
    if kind == "literal_error":
        return f"{head}: expected one of {ctx.get('expected', '').replace(chr(39), '').replace(' or ', ', ')}{got}"
    if kind == "too_short":
        return f"{head}: must not be empty"
    message = str(e.get("msg", kind)).removeprefix("Value error, ")
    return f"{head}: {message}"


def _fields_at(model: Any, loc: Sequence[str | int]) -> list[str]:
    """The keys a table at `loc` (below `model`) may have, for "did you mean"."""
    current: Any = model
    for step in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(step))
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (dict, Mapping):
            current = typing.get_args(current)[1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation
