"""Project names: anything that could become a path or an option is refused."""

from __future__ import annotations

import pytest

from api.names import dns_label_problem, project_name_problem


@pytest.mark.parametrize("name", ["lab", "Lab-01", "a.b_c-d", "x" * 128, "0"])
def test_valid_project_names(name: str) -> None:
    """Letters, digits, '-', '_' and '.' up to 128 characters are accepted."""
    assert project_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param(".", "invalid", id="dot"),
        pytest.param("..", "invalid", id="dotdot"),
        pytest.param("a/b", "invalid", id="slash"),
        pytest.param("-rf", "invalid", id="leading-dash"),
        pytest.param("a b", "invalid", id="space"),
        pytest.param("é", "invalid", id="unicode"),
        pytest.param("a\x00", "invalid", id="nul"),
        pytest.param("x" * 129, "at most 128", id="too-long"),
    ],
)
def test_invalid_project_names(name: str, message: str) -> None:
    """Each invalid name gets a reason."""
    problem = project_name_problem(name)
    assert problem is not None
    assert message in problem


@pytest.mark.parametrize(
    ("name", "valid"), [("web-01", True), ("Web", False), ("-a", False), ("a-", False), ("a" * 64, False)]
)
def test_dns_labels(name: str, valid: bool) -> None:
    """VM and disk names are RFC 1123 labels."""
    assert (dns_label_problem(name) is None) is valid
