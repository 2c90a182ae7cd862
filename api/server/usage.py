"""GET /api/v1/projects/{project}/usage?from=&to=&vm=&points=: what the project's VMs used, per
VM and in total, with the hourly points a chart draws (docs/usage.md).

The range is bounded (RANGE_MAX_DAYS) and so is the answer (ROWS_MAX hourly rows); a longer
one is a 400 that says to narrow it or to ask for totals only (`points=false` still reads the
rows, so the row bound holds for it too).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiohttp import web

from api.names import dns_label_problem
from api.server import params
from api.server.backend import project_of
from api.server.errors import BadRequest
from api.server.keys import DATABASE
from api.store.usage import TooManyRows, UsageStore
from api.usage import build_report

RANGE_MAX_DAYS = 400
DEFAULT_RANGE = timedelta(days=1)
# The longest RFC 3339 time worth parsing ("2026-12-03T13:00:00.123456+01:00" is 32).
TIME_MAX_CHARS = 40


def rfc3339(request: web.Request, name: str, *, default: datetime) -> datetime:
    """`?name=` as an RFC 3339 time with an offset (or Z); absent or empty is `default`."""
    value = request.query.get(name, "")
    if value == "":
        return default
    try:
        if len(value) > TIME_MAX_CHARS or "T" not in value.upper():
            raise ValueError
        parsed = datetime.fromisoformat(value)
    except ValueError:
        example = "2026-12-01T00:00:00Z"
        raise BadRequest(f"{name} must be an RFC 3339 time such as {example}, not {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{name} must say its offset from UTC (Z or +HH:MM): {value!r}")
    return parsed.astimezone(UTC)


async def project_usage(request: web.Request) -> web.StreamResponse:
    project = project_of(request)
    end = rfc3339(request, "to", default=datetime.now(UTC))
    start = rfc3339(request, "from", default=end - DEFAULT_RANGE)
    if start >= end:
        raise BadRequest(f"from ({start.isoformat()}) must be before to ({end.isoformat()})")
    if end - start > timedelta(days=RANGE_MAX_DAYS):
        raise BadRequest(f"the range may span at most {RANGE_MAX_DAYS} days")
    points = params.flag(request, "points") if "points" in request.query else True
    vm_name = request.query.get("vm") or None
    problem = dns_label_problem(vm_name) if vm_name is not None else None
    if problem:
        raise BadRequest(f"vm: {problem}")
    try:
        hours = await UsageStore(request.app[DATABASE]).hours(project, start, end, vm_name=vm_name)
    except TooManyRows as err:
        raise BadRequest(f"{err}: narrow the range") from None
    report = build_report(project, start, end, hours, points=points)
    return web.json_response(report.model_dump(mode="json", by_alias=True))
