"""The metric names a Grafana dashboard's PromQL asks for, and those a /metrics page exports.

Small on purpose: a tokenizer that knows PromQL's strings, durations, label matchers, range
brackets, grouping clauses and Grafana's `$variables`, and takes every other bare identifier
that is not a function call, an aggregation or a keyword for a metric name. Used by the unit test
of the dashboard and by the e2e test that compares it with a live server's /metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD_PATH = Path(__file__).resolve().parents[1] / "hack" / "observability" / "grafana-dashboard.json"

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    |(?P<number>(?:0[xX][0-9a-fA-F]+|\d[\d.]*(?:[eE][+-]?\d+)?)(?:[a-zA-Z]+\d*)*)
    |(?P<identifier>[A-Za-z_:][\w:]*)
    |(?P<space>\s+)
    |(?P<punct>.)
    """,
    re.VERBOSE,
)
# Followed by a parenthesised list of label names, never metric names.
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | frozenset({"offset", "bool", "and", "or", "unless", "atan2", "inf", "nan"})
# Aggregations may put their grouping clause before the parenthesis: `sum by (le) (x)`.
_AGGREGATIONS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*\w+\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.DOTALL)


def _tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs, spaces dropped."""
    found: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            found.append((kind, match.group()))
    return found


def _skip_parenthesised(tokens: list[tuple[str, str]], start: int) -> int:
    """The index after the `)` that closes the `(` at `start`."""
    depth = 0
    for index in range(start, len(tokens)):
        text = tokens[index][1]
        depth += (text == "(") - (text == ")")
        if depth == 0:
            return index + 1
    raise ValueError("unbalanced parentheses in PromQL expression")


def _names_in_matchers(tokens: list[tuple[str, str]], start: int) -> tuple[set[str], int]:
    """Metric names given as `{__name__="x"}`, and the index after the closing `}`."""
    names: set[str] = set()
    index = start + 1
    while index < len(tokens) and tokens[index][1] != "}":
        if tokens[index][1] == "__name__" and index + 2 < len(tokens) and tokens[index + 1][1] == "=":
            names.add(tokens[index + 2][1][1:-1])
        index += 1
    if index == len(tokens):
        raise ValueError("unbalanced braces in PromQL expression")
    return names, index + 1


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` selects. :raise ValueError: unbalanced brackets."""
    tokens = _tokens(expr)
    brackets = [text for kind, text in tokens if kind == "punct" and text in "()[]{}"]
    if any(brackets.count(a) != brackets.count(b) for a, b in ("()", "[]", "{}")):
        raise ValueError(f"unbalanced brackets in PromQL expression {expr!r}")
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text == "{":
            in_matchers, index = _names_in_matchers(tokens, index)
            names |= in_matchers
            continue
        if text == "[":
            while index < len(tokens) and tokens[index][1] != "]":
                index += 1
        elif kind == "identifier" and text.lower() in _GROUPING and following == "(":
            index = _skip_parenthesised(tokens, index + 1)
            continue
        elif kind == "identifier" and not (
            text.lower() in _KEYWORDS
            or following == "("
            or (text in _AGGREGATIONS and following.lower() in ("by", "without"))
        ):
            names.add(text)
        index += 1
    return names


def variable_expression(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query, if it has any."""
    for pattern, group in ((_LABEL_VALUES, "selector"), (_QUERY_RESULT, "expr")):
        match = pattern.match(query)
        if match:
            return match.group(group)
    return None


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, rows' panels included."""
    panels: list[dict[str, Any]] = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        expr = variable_expression(text)
        if expr is not None:
            yield f"variable {variable['name']!r}", expr


def exported_metric_names(exposition: str) -> set[str]:
    """The names a Prometheus text exposition lets a query select: every sample's name, and for
    each `# TYPE` family the names its samples would have, so a labelled family that has no
    series yet (no restart so far, say) still counts."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            if kind == "counter" and family.endswith("_total"):
                family = family.removesuffix("_total")
            names.update(family + suffix for suffix in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
