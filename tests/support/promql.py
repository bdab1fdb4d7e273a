"""Which metrics, with which labels, a PromQL expression needs: for tests/integration/test_chart.py.

Expressions are parsed by `promql-parser` (the Rust promql-parser crate, a real PromQL parser);
`selectors(expr)` walks its syntax tree and returns, for every metric selector, the metric name
and the label names the expression relies on there: the selector's own matchers plus the
`by (...)` / `without (...)` labels of every aggregation around it (so `sum by (le)
(rate(x_bucket[5m]))` needs `le` on `x_bucket`). Constructs whose label needs this walk does
not model (vector matching with on/ignoring, `@`, label_replace and other label functions,
subqueries, selectors without a metric name) raise `PromQLError`, so an unchecked construct
cannot slip through. (`offset` only shifts time, so it is allowed.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import promql_parser

# Functions that neither add nor rename labels.
FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "time", "absent",
             "absent_over_time", "vector", "scalar", "clamp_min", "clamp_max", "changes", "resets",
             "max_over_time", "min_over_time", "avg_over_time", "timestamp", "abs", "round"}


class PromQLError(ValueError):
    """An expression that does not parse, or that the checker cannot vouch for."""


class Selector(NamedTuple):
    metric: str
    labels: frozenset[str]  # matcher labels and the grouping labels of enclosing aggregations
    aggregated: bool  # inside some aggregation (sum, max, ...)


# Grafana's interval variables, which PromQL's grammar cannot read in a range, as typical values.
GRAFANA_DURATIONS = {"$__rate_interval": "2m", "$__interval": "1m", "$__range": "1d"}


def parse(expr: str) -> Any:
    """The syntax tree of `expr` (Grafana's interval variables replaced), or PromQLError."""
    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    try:
        return promql_parser.parse(expr)
    except Exception as exc:  # the binding raises plain ValueError/RuntimeError with the parser's message
        raise PromQLError(f"{expr!r}: {exc}") from exc


def _walk(node: Any, outer: frozenset[str] | None, out: list[Selector]) -> None:
    if isinstance(node, promql_parser.AggregateExpr):
        grouping = frozenset(node.modifier.labels) if node.modifier is not None else frozenset()
        if node.param is not None:
            _walk(node.param, outer, out)
        _walk(node.expr, (outer or frozenset()) | grouping, out)
    elif isinstance(node, promql_parser.Call):
        if node.func.name not in FUNCTIONS:
            raise PromQLError(f"unsupported function {node.func.name}")
        for arg in node.args:
            _walk(arg, outer, out)
    elif isinstance(node, promql_parser.BinaryExpr):
        if node.modifier is not None and node.modifier.matching is not None:
            raise PromQLError(f"unsupported vector matching {node.modifier.matching}")
        _walk(node.lhs, outer, out)
        _walk(node.rhs, outer, out)
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        _walk(node.expr, outer, out)
    elif isinstance(node, promql_parser.MatrixSelector):
        _walk(node.vector_selector, outer, out)
    elif isinstance(node, promql_parser.VectorSelector):
        if not node.name:
            raise PromQLError("selectors without a metric name are not supported")
        if node.at is not None:
            raise PromQLError(f"unsupported @ on {node.name}")
        matchers = frozenset(m.name for m in node.matchers.matchers)
        out.append(Selector(node.name, (outer or frozenset()) | matchers, outer is not None))
    elif isinstance(node, promql_parser.NumberLiteral | promql_parser.StringLiteral):
        pass
    else:
        raise PromQLError(f"unsupported expression {type(node).__name__}")


def selectors(expr: str) -> list[Selector]:
    """Every metric selector in `expr`, in order, with the labels it must carry."""
    out: list[Selector] = []
    _walk(parse(expr), None, out)
    return out
