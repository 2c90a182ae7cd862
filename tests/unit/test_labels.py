"""Label selectors: Kubernetes syntax parsed, matched as Kubernetes does, and errors that say why."""

from __future__ import annotations

import pytest

from api.labels import (
    REQUIREMENTS_MAX,
    SELECTOR_MAX_CHARS,
    Operator,
    Requirement,
    SelectorError,
    parse_selector,
)

WEB = {"app": "web", "env": "prod", "tofu-qemu.dev/tier": "front"}
DB = {"app": "db", "env": "dev"}
BARE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a=b", (Requirement("a", Operator.EQUALS, frozenset({"b"})),), id="equals"),
        pytest.param("a==b", (Requirement("a", Operator.EQUALS, frozenset({"b"})),), id="double-equals"),
        pytest.param("a!=b", (Requirement("a", Operator.NOT_EQUALS, frozenset({"b"})),), id="not-equals"),
        pytest.param("a in (x,y)", (Requirement("a", Operator.IN, frozenset({"x", "y"})),), id="in"),
        pytest.param("a notin (x)", (Requirement("a", Operator.NOT_IN, frozenset({"x"})),), id="notin"),
        pytest.param("a", (Requirement("a", Operator.EXISTS),), id="exists"),
        pytest.param("!a", (Requirement("a", Operator.DOES_NOT_EXIST),), id="not-exists"),
        pytest.param("a=", (Requirement("a", Operator.EQUALS, frozenset({""})),), id="empty-value"),
        pytest.param(
            "  x.io/a = b ,  c in ( d , e ) ",
            (
                Requirement("x.io/a", Operator.EQUALS, frozenset({"b"})),
                Requirement("c", Operator.IN, frozenset({"d", "e"})),
            ),
            id="prefixed-key-and-blanks",
        ),
        pytest.param(
            "in in (in)", (Requirement("in", Operator.IN, frozenset({"in"})),), id="keyword-as-names"
        ),
        pytest.param("a in(x)", (Requirement("a", Operator.IN, frozenset({"x"})),), id="no-blank-before-set"),
    ],
)
def test_selectors_parse(text: str, expected: tuple[Requirement, ...]) -> None:
    """Every Kubernetes equality- and set-based form parses to its requirement."""
    assert parse_selector(text).requirements == expected


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_selector_matches_everything(text: str) -> None:
    """No requirements: every label set matches."""
    selector = parse_selector(text)
    assert selector.is_empty
    assert all(selector.matches(labels) for labels in (WEB, DB, BARE))


@pytest.mark.parametrize(
    ("text", "web", "db", "bare"),
    [
        pytest.param("app=web", True, False, False, id="equals"),
        pytest.param("app!=web", False, True, True, id="not-equals-matches-missing-key"),
        pytest.param("app in (web,db)", True, True, False, id="in"),
        pytest.param("env notin (prod)", False, True, True, id="notin-matches-missing-key"),
        pytest.param("env", True, True, False, id="exists"),
        pytest.param("!env", False, False, True, id="does-not-exist"),
        pytest.param("app=web,env=prod", True, False, False, id="comma-is-and"),
        pytest.param("app=web,env=dev", False, False, False, id="and-of-disjoint"),
        pytest.param("tofu-qemu.dev/tier=front", True, False, False, id="prefixed-key"),
    ],
)
def test_matching_follows_kubernetes(text: str, web: bool, db: bool, bare: bool) -> None:
    """`!=` and `notin` match objects without the key; commas are AND."""
    selector = parse_selector(text)
    assert (selector.matches(WEB), selector.matches(DB), selector.matches(BARE)) == (web, db, bare)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("a in ()", "expected a value", id="empty-set"),
        pytest.param("a in (x", "found the end", id="unclosed-set"),
        pytest.param("a in x", "expected '('", id="set-without-parens"),
        pytest.param("a in (x y)", "expected ',' or ')'", id="set-without-comma"),
        pytest.param("=b", "expected a label key", id="no-key"),
        pytest.param("a b", "after key 'a' expected one of", id="two-words"),
        pytest.param("a=b=c", "unexpected '='", id="two-equals"),
        pytest.param("a,", "found the end", id="trailing-comma"),
        pytest.param(",a", "expected a label key", id="leading-comma"),
        pytest.param("!", "found the end", id="bare-bang"),
        pytest.param("a>1", "label key 'a>1'", id="gt-unsupported"),
        pytest.param("a=b c", "unexpected 'c'", id="value-then-word"),
        pytest.param("-a=b", "label key '-a'", id="bad-key"),
        pytest.param("a=-b", "label value '-b'", id="bad-value"),
        pytest.param("a=(b)", "expected a value for 'a'", id="paren-value"),
        pytest.param("a=" + "v" * 64, "label value", id="value-too-long"),
        pytest.param("a" * (SELECTOR_MAX_CHARS + 1), "at most", id="too-long"),
        pytest.param(",".join(f"k{i}" for i in range(REQUIREMENTS_MAX + 1)), "requirements", id="too-many"),
    ],
)
def test_bad_selectors_say_what_is_wrong(text: str, message: str) -> None:
    """Each syntax error is a SelectorError (a ValueError) whose message names the problem."""
    with pytest.raises(SelectorError, match="label selector") as caught:
        parse_selector(text)
    assert message in str(caught.value)
