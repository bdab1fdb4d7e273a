"""Which metrics, with which labels, a PromQL expression needs: for tests/integration/test_chart.py.

`selectors(expr)` tokenizes an expression (from the chart's alert rules or Grafana dashboard)
and returns, for every metric selector, the metric name and the label names the expression
relies on there: the selector's own matchers plus the `by (...)` / `without (...)` labels of
every aggregation around it (so `sum by (le) (rate(x_bucket[5m]))` needs `le` on `x_bucket`).
It is not a PromQL parser: it knows the syntax the chart uses and raises `PromQLError` on
anything else (vector matching with on/ignoring, offsets, unknown functions or keywords), so
an unchecked construct cannot slip through. Syntax itself is checked by `promtool`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=(){},])
""", re.X)
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values"}
FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "time", "absent",
             "absent_over_time", "vector", "scalar", "clamp_min", "clamp_max", "changes", "resets",
             "max_over_time", "min_over_time", "avg_over_time", "timestamp", "abs", "round"}
SET_OPERATORS = {"and", "or", "unless", "bool"}
UNSUPPORTED = {"on", "ignoring", "group_left", "group_right", "offset", "by", "without", "atan2"}


class PromQLError(ValueError):
    """An expression the checker cannot vouch for."""


class Selector(NamedTuple):
    metric: str
    labels: frozenset[str]  # matcher labels and the grouping labels of enclosing aggregations
    aggregated: bool  # inside some aggregation (sum, max, ...)


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None or m.lastgroup is None:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
        pos = m.end()
    return out


def _close(toks: list[tuple[str, str]], i: int, opening: str, closing: str) -> int:
    """Index of the token closing the bracket at `i`."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j] == ("op", opening):
            depth += 1
        elif toks[j] == ("op", closing):
            depth -= 1
            if depth == 0:
                return j
    raise PromQLError(f"unbalanced {opening!r}")


def _labels(toks: list[tuple[str, str]], i: int) -> tuple[set[str], int]:
    """The label list `( a, b )` starting at `i`, and the index after it."""
    if i >= len(toks) or toks[i] != ("op", "("):
        raise PromQLError("by/without needs a label list")
    end = _close(toks, i, "(", ")")
    names = [t for t in toks[i + 1:end] if t != ("op", ",")]
    if any(kind != "ident" for kind, _ in names):
        raise PromQLError(f"bad label list {names!r}")
    return {text for _, text in names}, end + 1


def _walk(toks: list[tuple[str, str]], start: int, stop: int, outer: frozenset[str] | None,
          out: list[Selector]) -> None:
    """Selectors in toks[start:stop]; `outer` is None outside aggregations, else their labels."""
    i = start
    while i < stop:
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < stop else ("", "")
        if kind == "ident" and text in AGGREGATIONS:
            grouping: set[str] = set()
            j = i + 1
            if toks[j][0] == "ident" and toks[j][1] in ("by", "without"):
                grouping, j = _labels(toks, j + 1)
            end = _close(toks, j, "(", ")")
            if end + 1 < stop and toks[end + 1][0] == "ident" and toks[end + 1][1] in ("by", "without"):
                more, after = _labels(toks, end + 2)
                grouping |= more
            else:
                after = end + 1
            _walk(toks, j + 1, end, (outer or frozenset()) | grouping, out)
            i = after
        elif kind == "ident" and text in FUNCTIONS:
            if nxt != ("op", "("):
                raise PromQLError(f"function {text} without arguments")
            i += 1
        elif kind == "ident" and (text in UNSUPPORTED or nxt == ("op", "(")):
            raise PromQLError(f"unsupported here: {text!r}")
        elif kind == "ident" and text in SET_OPERATORS:
            i += 1
        elif kind == "ident":
            matchers: set[str] = set()
            i += 1
            if nxt == ("op", "{"):
                end = _close(toks, i, "{", "}")
                body = [t for t in toks[i + 1:end] if t != ("op", ",")]
                if len(body) % 3 or any(body[k][0] != "ident" or body[k + 1][1] not in ("=", "!=", "=~", "!~")
                                        or body[k + 2][0] != "str" for k in range(0, len(body), 3)):
                    raise PromQLError(f"bad matchers in {text}{{...}}")
                matchers = {body[k][1] for k in range(0, len(body), 3)}
                i = end + 1
            out.append(Selector(text, (outer or frozenset()) | matchers, outer is not None))
        elif (kind, text) == ("op", "{"):
            raise PromQLError("selectors without a metric name are not supported")
        else:
            i += 1


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in `expr`, in order, with the labels it must carry."""
    toks = tokenize(expr)
    out: list[Selector] = []
    _walk(toks, 0, len(toks), None, out)
    return out
