"""Kubernetes label selectors: parse `?labelSelector=` and match labels against it. Pure.

The syntax is Kubernetes' set-based one (k8s.io/apimachinery pkg/labels/selector.go), minus the
numeric `gt`/`lt` operators: requirements separated by commas, all of which must hold:

    key=value   key==value   key!=value   key in (a,b)   key notin (a)   key   !key

As in Kubernetes, `!=` and `notin` also match objects that lack the key, and an empty selector
matches everything. Keys and values follow the label rules of api/names.py, so a selector that
names an impossible label is an error rather than a silent empty result.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from api import names

SELECTOR_MAX_CHARS = 4096
REQUIREMENTS_MAX = 64
SET_VALUES_MAX = 64
# Operators and punctuation, or a run of anything else (a key, a value or `in`/`notin`).
_TOKEN_RE = re.compile(r"\s*(==|!=|=|!|\(|\)|,|[^\s=!(),]+)")


class SelectorError(ValueError):
    """The selector is not valid; the message says where and why."""


class Operator(StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case Operator.EQUALS | Operator.IN:
                return self.key in labels and labels[self.key] in self.values
            case Operator.NOT_EQUALS | Operator.NOT_IN:
                return self.key not in labels or labels[self.key] not in self.values
            case Operator.EXISTS:
                return self.key in labels
            case Operator.DOES_NOT_EXIST:
                return self.key not in labels


@dataclass(frozen=True, slots=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)

    @property
    def is_empty(self) -> bool:
        return not self.requirements


EVERYTHING = Selector()


def parse_selector(text: str) -> Selector:
    """Parse a label selector. :raise SelectorError: saying what is wrong and where."""
    if len(text) > SELECTOR_MAX_CHARS:
        raise SelectorError(f"label selector is {len(text)} characters long; at most {SELECTOR_MAX_CHARS}")
    parts = _split(text)
    if not parts:
        return EVERYTHING
    parser = _Parser(parts)
    requirements = [parser.requirement()]
    while parser.take(","):
        requirements.append(parser.requirement())
    if not parser.at_end():
        raise SelectorError(f"label selector: unexpected {parser.peek()!r} after a requirement")
    if len(requirements) > REQUIREMENTS_MAX:
        raise SelectorError(
            f"label selector has {len(requirements)} requirements; at most {REQUIREMENTS_MAX}"
        )
    return Selector(tuple(requirements))


def _split(text: str) -> list[str]:
    parts = []
    position = 0
    # The pattern matches wherever anything but blanks is left.
    while (match := _TOKEN_RE.match(text, position)) is not None:
        parts.append(match[1])
        position = match.end()
    return parts


class _Parser:
    def __init__(self, parts: list[str]) -> None:
        self._parts = parts
        self._index = 0

    def peek(self) -> str | None:
        return self._parts[self._index] if self._index < len(self._parts) else None

    def at_end(self) -> bool:
        return self._index >= len(self._parts)

    def take(self, part: str) -> bool:
        if self.peek() == part:
            self._index += 1
            return True
        return False

    def next(self, expected: str) -> str:
        part = self.peek()
        if part is None:
            raise SelectorError(f"label selector: expected {expected}, found the end")
        self._index += 1
        return part

    def requirement(self) -> Requirement:
        if self.take("!"):
            return Requirement(self._key(self.next("a label key after '!'")), Operator.DOES_NOT_EXIST)
        key = self._key(self.next("a label key"))
        part = self.peek()
        if part is None or part == ",":
            return Requirement(key, Operator.EXISTS)
        self._index += 1
        if part in ("=", "=="):
            return Requirement(key, Operator.EQUALS, frozenset({self._value(key)}))
        if part == "!=":
            return Requirement(key, Operator.NOT_EQUALS, frozenset({self._value(key)}))
        if part in ("in", "notin"):
            return Requirement(key, Operator(part), self._set(key, part))
        raise SelectorError(
            f"label selector: after key {key!r} expected one of '=', '==', '!=', 'in', 'notin', "
            f"',' or the end, found {part!r}"
        )

    def _key(self, part: str) -> str:
        if part in ("(", ")", ",", "=", "==", "!=", "!"):
            raise SelectorError(f"label selector: expected a label key, found {part!r}")
        problem = names.label_key_problem(part)
        if problem:
            raise SelectorError(f"label selector: {problem}")
        return part

    def _value(self, key: str) -> str:
        # `a=` selects the empty value, as in Kubernetes.
        part = self.peek()
        if part is None or part in (",", ")"):
            return ""
        self._index += 1
        return self._checked_value(part, key)

    def _checked_value(self, part: str, key: str) -> str:
        if part in ("(", ")", ",", "=", "==", "!=", "!"):
            raise SelectorError(f"label selector: expected a value for {key!r}, found {part!r}")
        problem = names.label_value_problem(part)
        if problem:
            raise SelectorError(f"label selector: {problem}")
        return part

    def _set(self, key: str, operator: str) -> frozenset[str]:
        if not self.take("("):
            raise SelectorError(f"label selector: expected '(' after {key!r} {operator}")
        values: set[str] = set()
        while True:
            values.add(self._checked_value(self.next(f"a value in the set of {key!r}"), key))
            part = self.next(f"',' or ')' in the set of {key!r}")
            if part == ")":
                return frozenset(values)
            if part != ",":
                raise SelectorError(
                    f"label selector: expected ',' or ')' in the set of {key!r}, found {part!r}"
                )
            if len(values) >= SET_VALUES_MAX:
                raise SelectorError(f"label selector: at most {SET_VALUES_MAX} values in a set")
