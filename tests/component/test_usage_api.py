"""GET /api/v1/projects/{project}/usage over HTTP: the report, its bounds, and its errors."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.client.usage import parse_since
from api.server.keys import DATABASE
from api.server.usage import RANGE_MAX_DAYS
from api.store.usage import UsageStore
from api.usage import HourUsage, Usage
from tests.component.conftest import AUTH
from tests.component.test_states_purge import cli

HOUR = datetime(2026, 12, 3, 13, tzinfo=UTC)
URL = "/api/v1/projects/lab/usage"


async def seed(client: TestClient[Any, Any]) -> None:
    rows = [
        HourUsage("u1", "lab", "web", HOUR, Usage(10, 1000, 3600), 100),
        HourUsage("u1", "lab", "web", HOUR + timedelta(hours=1), Usage(20, 2000, 3600), 200),
        HourUsage("u2", "lab", "db", HOUR + timedelta(hours=1), Usage(5, 500, 1800), 50),
        HourUsage("u3", "other", "web", HOUR, Usage(99, 99, 99), 99),
    ]
    await UsageStore(client.app[DATABASE]).record(rows, {})


async def test_the_report_has_totals_per_vm_and_project_and_hourly_points(
    client: TestClient[Any, Any],
) -> None:
    await seed(client)
    response = await client.get(
        URL, params={"from": "2026-12-03T13:00:00Z", "to": "2026-12-03T15:00:00Z"}, headers=AUTH
    )
    assert response.status == 200
    body = await response.json()
    assert (body["kind"], body["from"], body["to"]) == (
        "UsageReport",
        "2026-12-03T13:00:00Z",
        "2026-12-03T15:00:00Z",
    )
    assert body["total"] == {
        "cpuSeconds": 35.0,
        "memoryMibSeconds": 3500.0,
        "uptimeSeconds": 9000.0,
        "diskBytes": 250,
    }
    db, web = body["vms"]
    assert (db["name"], web["name"], web["uid"]) == ("db", "web", "u1")
    assert web["total"]["cpuSeconds"] == 30.0
    assert [(p["hour"], p["cpuSeconds"]) for p in web["points"]] == [
        ("2026-12-03T13:00:00Z", 10.0),
        ("2026-12-03T14:00:00Z", 20.0),
    ]


async def test_the_range_selects_hours_and_points_false_gives_totals_only(
    client: TestClient[Any, Any],
) -> None:
    await seed(client)
    params = {"from": "2026-12-03T15:30:00+01:00", "to": "2026-12-03T16:00:00+01:00", "points": "false"}
    body = await (await client.get(URL, params=params, headers=AUTH)).json()
    db, web = body["vms"]
    assert (db["total"]["cpuSeconds"], web["total"]["cpuSeconds"], web["points"]) == (5.0, 20.0, [])


async def test_defaults_cover_the_last_day(client: TestClient[Any, Any]) -> None:
    now = datetime.now(UTC)
    await UsageStore(client.app[DATABASE]).record(
        [HourUsage("u1", "lab", "web", now.replace(minute=0, second=0, microsecond=0), Usage(1, 1, 1), 1)], {}
    )
    body = await (await client.get(URL, headers=AUTH)).json()
    assert body["total"]["cpuSeconds"] == 1.0
    assert datetime.fromisoformat(body["to"]) - datetime.fromisoformat(body["from"]) == timedelta(days=1)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"from": "yesterday"}, "from must be an RFC 3339 time"),
        ({"from": "2026-12-03"}, "from must be an RFC 3339 time"),
        ({"to": "2026-12-03T13:00:00"}, "to must say its offset"),
        ({"from": "2026-12-03T13:00:00Z", "to": "2026-12-03T12:00:00Z"}, "must be before to"),
        ({"from": "2026-12-03T13:00:00Z", "to": "2026-12-03T13:00:00Z"}, "must be before to"),
        ({"from": "2025-01-01T00:00:00Z", "to": "2026-12-03T00:00:00Z"}, f"at most {RANGE_MAX_DAYS} days"),
        ({"from": "2" * 41}, "from must be an RFC 3339 time"),
        ({"points": "maybe"}, "points must be true, false"),
    ],
)
async def test_bad_input_is_a_json_status_400(
    client: TestClient[Any, Any], params: dict[str, str], message: str
) -> None:
    response = await client.get(URL, params=params, headers=AUTH)
    assert response.status == 400
    body = await response.json()
    assert (body["kind"], body["code"]) == ("Status", 400)
    assert message in body["message"]


async def test_the_range_bound_is_400_days(client: TestClient[Any, Any]) -> None:
    end = datetime(2026, 12, 3, tzinfo=UTC)
    ok = {"from": (end - timedelta(days=400)).isoformat(), "to": end.isoformat()}
    assert (await client.get(URL, params=ok, headers=AUTH)).status == 200
    over = {"from": (end - timedelta(days=400, seconds=1)).isoformat(), "to": end.isoformat()}
    assert (await client.get(URL, params=over, headers=AUTH)).status == 400


async def test_usage_needs_authentication_and_a_valid_project(client: TestClient[Any, Any]) -> None:
    assert (await client.get(URL)).status == 401
    response = await client.get("/api/v1/projects/-bad/usage", headers=AUTH)
    assert response.status == 400


async def test_the_route_is_in_the_openapi_document(client: TestClient[Any, Any]) -> None:
    document = await (await client.get("/openapi.json", headers=AUTH)).json()
    operation = document["paths"]["/api/v1/projects/{project}/usage"]["get"]
    assert {parameter["name"] for parameter in operation["parameters"]} >= {"project", "from", "to", "points"}
    assert "UsageReport" in document["components"]["schemas"]


def cli_env(client: TestClient[Any, Any]) -> dict[str, str]:
    return {
        "TOFU_QEMU_SERVER": str(client.make_url("/")),
        "TOFU_QEMU_USERNAME": "alice",
        "TOFU_QEMU_PASSWORD": "s3cret",
    }


async def test_the_cli_prints_the_last_week_as_a_table_and_json(
    client: TestClient[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`tofu-qemu usage PROJECT --since 7d`: one row per VM and a TOTAL; -o json is the report."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows = [
        HourUsage("u1aaaaaaaa", "lab", "web", now - timedelta(days=6), Usage(7200, 3600 * 512, 7200), 2**21),
        HourUsage("u2bbbbbbbb", "lab", "db", now, Usage(36, 3600 * 256, 3600), 2**20),
        HourUsage("u3cccccccc", "lab", "old", now - timedelta(days=8), Usage(1, 1, 1), 1),
    ]
    await UsageStore(client.app[DATABASE]).record(rows, {})
    status, out = await asyncio.to_thread(cli, "usage", "lab", "--since", "7d", env=cli_env(client))
    assert status == 0
    assert out.splitlines() == [
        "NAME    UID        CPU(s)   MEM(MiB-h)   UPTIME   DISK(MiB)",
        "db      u2bbbbbb   36.0     256.0        60m      1.0",
        "web     u1aaaaaa   7200.0   512.0        120m     2.0",
        "TOTAL   <none>     7236.0   768.0        3h       3.0",
    ]
    status, out = await asyncio.to_thread(
        cli, "usage", "lab", "--since", "1d12h", "-o", "json", env=cli_env(client)
    )
    assert [vm["name"] for vm in json.loads(out)["vms"]] == ["db"]
    assert await asyncio.to_thread(cli, "usage", "lab", "--since", "soon", env=cli_env(client)) == (1, "")
    assert "is not a duration" in capsys.readouterr().err


def test_since_parses_days_hours_and_minutes() -> None:
    assert parse_since("7d") == timedelta(days=7)
    assert parse_since("1d12h") == timedelta(days=1, hours=12)
    assert parse_since("90m") == timedelta(minutes=90)
    for bad in ("0d", "", "7x", "-1d"):
        with pytest.raises(ValueError, match="duration"):
            parse_since(bad)


async def test_vm_narrows_the_report_to_the_vms_of_a_name(client: TestClient[Any, Any]) -> None:
    """A VM page's chart asks for one name: every uid that had it, and nothing else."""
    await seed(client)
    await UsageStore(client.app[DATABASE]).record(
        [HourUsage("u4", "lab", "web", HOUR + timedelta(hours=1), Usage(1, 1, 1), 1)], {}
    )
    params = {"from": "2026-12-03T13:00:00Z", "to": "2026-12-03T15:00:00Z", "vm": "web"}
    body = await (await client.get(URL, params=params, headers=AUTH)).json()
    assert [(vm["uid"], vm["name"]) for vm in body["vms"]] == [("u1", "web"), ("u4", "web")]
    assert body["total"]["cpuSeconds"] == 31.0
    response = await client.get(URL, params={"vm": "Not_A_Name"}, headers=AUTH)
    assert response.status == 400
    assert "vm: " in (await response.json())["message"]


async def test_too_many_rows_is_a_400_that_says_to_narrow_the_range(client: TestClient[Any, Any]) -> None:
    rows = [HourUsage(f"u{n}", "lab", f"vm-{n}", HOUR, Usage(1, 1, 1), 1) for n in range(10_001)]
    await UsageStore(client.app[DATABASE]).record(rows, {})
    params = {"from": "2026-12-03T13:00:00Z", "to": "2026-12-03T14:00:00Z"}
    response = await client.get(URL, params=params, headers=AUTH)
    assert response.status == 400
    assert "more than 10000 hourly rows: narrow the range" in (await response.json())["message"]
