"""Go and Sprig value semantics for helmlite (tests/support/helmlite.py), the chart tests' renderer.

How Helm prints, compares, quotes and serializes values, and the template functions charts/reup
uses (`FUNCS`; `include` is bound by the renderer). Only what the chart needs; anything else
raises `TemplateError`. Called by helmlite.py only.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import yaml


class TemplateError(Exception):
    """A construct helmlite does not support, a malformed template or a missing value."""


class RenderFail(TemplateError):
    """The template itself failed (`fail`, `required`), as `helm template` would."""


def go_float(x: float) -> str:
    """fmt's %v of a float64: shortest digits, exponent form from 1e+06 up and below 1e-04."""
    if x == 0:
        return "0"
    sign, digits, exp = Decimal(repr(float(x))).normalize().as_tuple()
    assert isinstance(exp, int)
    ds = "".join(map(str, digits))
    e = len(ds) + exp - 1
    neg = "-" if sign else ""
    if e < -4 or e >= 6:
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    return neg + format(Decimal(repr(float(x))).normalize(), "f")


def go_str(v: Any) -> str:
    """fmt's %v of a scalar; printing nil or a map/list is refused (Helm would print `<no value>`/`map[...]`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | int):
        return str(v)
    if isinstance(v, float):
        return go_float(v)
    raise TemplateError("printing a missing (nil) value" if v is None else f"printing a {type(v).__name__} (use toYaml or toJson)")


GO_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def go_quote(s: str) -> str:
    """fmt's %q (what sprig's quote uses), for the characters charts contain."""
    return '"' + "".join(GO_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in s) + '"'


def numbers(v: Any, f: Callable[[Any], Any]) -> Any:
    """`v` with `f` applied to every number (not bool) inside it."""
    if isinstance(v, dict):
        return {str(k): numbers(x, f) for k, x in v.items()}
    if isinstance(v, list):
        return [numbers(x, f) for x in v]
    return f(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def plain(v: Any) -> Any:
    """float64 values as Go's JSON/YAML encoders write them (integral ones without '.0')."""
    return numbers(v, lambda x: int(x) if float(x).is_integer() and abs(x) < 1e21 else x)


def as_float64(v: Any) -> Any:
    """Values as Helm sees them after its YAML->JSON round trip: every number a float64."""
    return numbers(v, float)


def truth(v: Any) -> bool:
    """Go template truth: false, 0, nil and empty strings, maps and lists are false."""
    if isinstance(v, bool) or v is None:
        return bool(v)
    if isinstance(v, int | float):
        return v != 0
    return len(v) > 0 if isinstance(v, str | dict | list) else True


def kind(v: Any) -> str:
    for t, k in ((bool, "bool"), (str, "string"), (int, "int"), (float, "float64"), (dict, "map"), (list, "slice")):
        if isinstance(v, t):
            return k
    return "invalid" if v is None else type(v).__name__


def compare(op: str, a: Any, b: Any) -> bool:
    if kind(a) != kind(b) or kind(a) not in ("bool", "string", "int", "float64") or (op not in ("eq", "ne") and kind(a) == "bool"):
        raise TemplateError(f"{op}: incompatible types for comparison ({kind(a)}, {kind(b)})")
    return bool({"eq": a == b, "ne": a != b, "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[op])


def merge_overwrite(dst: dict[str, Any], *srcs: dict[str, Any]) -> dict[str, Any]:
    for src in srcs:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge_overwrite(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)
    return dst


def to_yaml(v: Any) -> str:
    return str(yaml.safe_dump(plain(v), default_flow_style=False, sort_keys=True, width=10_000)).removesuffix("\n")


def to_json(v: Any) -> str:
    text = json.dumps(plain(v), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _printf(fmt: str, *args: Any) -> str:
    """Go's Sprintf for %s (strings), %d (ints), %v, %q and %%; a wrong type is an error, as Go prints %!d(...)."""
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        if m.group() == "%%":
            return "%"
        v, verb = next(it), m.group()[1]
        if (verb in "sq" and not isinstance(v, str)) or (verb == "d" and kind(v) != "int"):
            raise TemplateError(f"printf: %{verb} of a {kind(v)}")
        return go_quote(v) if verb == "q" else go_str(v)
    out = re.sub(r"%[sdvq%]", one, fmt)
    if re.search(r"%[^sdvq%]", fmt) or next(it, StopIteration) is not StopIteration:
        raise TemplateError(f"printf: unsupported format or argument count: {fmt!r}")
    return out


def _required(msg: str, v: Any) -> Any:
    if v is None or v == "":
        raise RenderFail(msg)
    return v


def _fail(msg: str) -> Any:
    raise RenderFail(msg)


def _fail_type(fn: str, v: Any) -> str:
    raise TemplateError(f"{fn}: helmlite takes only strings here, got {kind(v)}")


def _int(v: Any) -> int:
    return int(float(v)) if isinstance(v, str) else int(v)


FUNCS: dict[str, Callable[..., Any]] = {
    "include": lambda *a: None,  # bound per render (needs the templates)
    "quote": lambda *a: " ".join(go_quote(go_str(x)) for x in a if x is not None),
    "default": lambda d, *v: v[0] if v and truth(v[0]) else d,
    "toYaml": to_yaml, "toJson": to_json, "toString": go_str, "int": _int,
    "indent": lambda n, s: " " * n + s.replace("\n", "\n" + " " * n),
    "nindent": lambda n, s: "\n" + " " * n + s.replace("\n", "\n" + " " * n),
    "b64enc": lambda s: base64.b64encode(s.encode()).decode(),
    "sha256sum": lambda s: hashlib.sha256(s.encode()).hexdigest(),
    "printf": _printf, "print": lambda *a: "".join(x if isinstance(x, str) else _fail_type("print", x) for x in a),
    "trunc": lambda n, s: s[:n], "trimSuffix": lambda suf, s: s.removesuffix(suf),
    "contains": lambda sub, s: sub in s, "kindIs": lambda k, v: kind(v) == k,
    "eq": lambda a, b: compare("eq", a, b), "ne": lambda a, b: compare("ne", a, b),
    "lt": lambda a, b: compare("lt", a, b), "le": lambda a, b: compare("le", a, b),
    "gt": lambda a, b: compare("gt", a, b), "ge": lambda a, b: compare("ge", a, b),
    "not": lambda v: not truth(v), "empty": lambda v: not truth(v),
    "and": lambda *a: next((x for x in a if not truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if truth(x)), a[-1]),
    "required": _required, "fail": _fail,
    "dict": lambda *a: {str(a[i]): a[i + 1] for i in range(0, len(a), 2)},
    "deepCopy": copy.deepcopy, "mergeOverwrite": merge_overwrite, "sub": lambda a, b: _int(a) - _int(b),
}


