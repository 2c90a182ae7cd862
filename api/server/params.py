"""Query parameters of the Kubernetes-style API, validated at the edge.

Every bad value is a BadRequest (400 with a JSON Status naming the parameter). Unknown
parameters are ignored, as Kubernetes does.
"""

from __future__ import annotations

from aiohttp import web

from api.labels import Selector, SelectorError, parse_selector
from api.names import project_name_problem
from api.server.errors import BadRequest

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0", ""})
# 18 digits fit SQLite's signed 64-bit integer with room to spare.
_DIGITS_MAX = 18


def flag(request: web.Request, name: str) -> bool:
    """`?name=true|1|false|0`; absent is false."""
    value = request.query.get(name, "")
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequest(f"{name} must be true, false, 1 or 0, not {value[:40]!r}")


def integer(request: web.Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    """`?name=N` with minimum <= N <= maximum; absent (or empty) is `default`."""
    value = request.query.get(name, "")
    if value == "":
        return default
    # isascii: "²" is a digit to str.isdigit() and an error to int().
    if not (value.isascii() and value.isdigit()) or len(value) > _DIGITS_MAX:
        raise BadRequest(f"{name} must be a non-negative integer, not {value[:40]!r}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise BadRequest(f"{name} must be between {minimum} and {maximum}, not {number}")
    return number


def label_selector(request: web.Request) -> Selector:
    try:
        return parse_selector(request.query.get("labelSelector", ""))
    except SelectorError as err:
        raise BadRequest(str(err)) from err


def project_scope(request: web.Request) -> str | None:
    """The project a list or watch is limited to: the `{project}` path segment, or `?project=`.

    :raise BadRequest: an invalid project name, or a `?project=` that contradicts the path.
    """
    in_path = request.match_info.get("project")
    in_query = request.query.get("project") or None
    for candidate in (in_path, in_query):
        problem = project_name_problem(candidate) if candidate is not None else None
        if problem:
            raise BadRequest(problem)
    if in_path is not None and in_query is not None and in_query != in_path:
        raise BadRequest(f"?project={in_query} contradicts the project {in_path!r} in the path")
    return in_path or in_query
