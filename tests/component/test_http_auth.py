"""Authentication on every route: only valid credentials pass, except the probes (and /metrics
when metrics_auth is off). Lock IDs are never a credential.

The route table is built from api/server/routes.py ROUTES, plus the HEAD routes aiohttp adds to
GETs, and checked against the running app's router: a new route is covered, or a test fails.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.server.auth import METRICS_PATH, PROBE_PATHS
from api.server.routes import ROUTES
from api.settings import ServerSettings

Client = TestClient[Any, Any]
MakeClient = Callable[[ServerSettings], Awaitable[Client]]
LOCK_ID = "lock-id-1"
LOCK_BODY = b'{"ID": "lock-id-1", "Operation": "OperationTypeApply", "Who": "alice@ci"}'
# A value for every path placeholder; a route with a new placeholder fails here until it has one.
SAMPLE_VALUES = {"project": "lab", "serial": "1", "name": "web", "host": "node-1"}
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def served_routes() -> list[tuple[str, str]]:
    """(method, path template) for everything the app answers: ROUTES, and HEAD on each GET
    that aiohttp answers HEAD for (allow_head defaults to True)."""
    table = []
    for route in ROUTES:
        table.append((route.method, route.path))
        if route.method == "GET" and route.kwargs.get("allow_head", True):
            table.append(("HEAD", route.path))
    return table


def concrete(template: str) -> str:
    return PLACEHOLDER.sub(lambda match: SAMPLE_VALUES[match[1]], template)


TABLE = [(method, concrete(template)) for method, template in served_routes()]
PUBLIC = [(method, path) for method, path in TABLE if path in PROBE_PATHS]
PROTECTED = [(method, path) for method, path in TABLE if path not in PROBE_PATHS]
RIGHT = {"basic": basic("alice", "s3cret"), "bearer": {"Authorization": "Bearer tok-1"}}
WRONG = {
    "none": {},
    "wrong-password": basic("alice", "wrong"),
    "unknown-user": basic("mallory", "s3cret"),
    "empty-password": basic("alice", ""),
    "no-colon": {"Authorization": "Basic " + base64.b64encode(b"alices3cret").decode()},
    "password-as-user": basic("s3cret", "alice"),
    "token-as-password": basic("alice", "tok-1"),
    "wrong-token": {"Authorization": "Bearer tok-2"},
    "token-prefix": {"Authorization": "Bearer tok-"},
    "empty-bearer": {"Authorization": "Bearer "},
    "other-scheme": {"Authorization": "Token tok-1"},
    "garbage": {"Authorization": "Basic !!!"},
    "basic-with-trailer": {"Authorization": basic("alice", "s3cret")["Authorization"] + " x"},
    "no-scheme": {"Authorization": base64.b64encode(b"alice:s3cret").decode()},
}


def route_ids(table: list[tuple[str, str]]) -> list[str]:
    return [f"{method} {path}" for method, path in table]


async def request(client: Client, method: str, path: str, headers: dict[str, str], **params: str) -> Any:
    return await client.request(method, path, headers=headers, params=params, data=LOCK_BODY)


def test_every_route_the_app_serves_is_in_the_table(client: Client) -> None:
    """The app's router holds exactly the table's routes, so none can escape these tests."""
    served = {
        (route.method, route.resource.canonical) for route in client.app.router.routes() if route.resource
    }
    assert served == set(served_routes())
    assert len(PROTECTED) + len(PUBLIC) == len(TABLE)


def test_the_security_doc_counts_the_protected_routes() -> None:
    """docs/security.md "Authentication" says how many method and path pairs need credentials."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text(encoding="utf-8")
    counts = re.findall(r"\((\d+) protected method and path pairs\)", doc)
    assert counts == [str(len(PROTECTED))]


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=route_ids(PROTECTED))
async def test_wrong_credentials_get_401_on_every_protected_route(
    client: Client, method: str, path: str
) -> None:
    """Every kind of wrong or missing credential is a 401 with a Basic challenge and a JSON Status."""
    for kind, headers in WRONG.items():
        response = await request(client, method, path, headers)
        assert response.status == 401, kind
        assert response.headers["WWW-Authenticate"].startswith("Basic"), kind
        if method != "HEAD":
            assert (await response.json())["code"] == 401, kind


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=route_ids(PROTECTED))
async def test_right_credentials_pass_on_every_protected_route(
    client: Client, method: str, path: str
) -> None:
    """Valid Basic credentials and a valid bearer token both get past auth."""
    for kind, headers in RIGHT.items():
        response = await request(client, method, path, headers)
        assert response.status not in (401, 403), kind


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=route_ids(PROTECTED))
async def test_a_held_lock_id_is_never_a_credential(client: Client, method: str, path: str) -> None:
    """With the lock held, its ID as ?ID=, as a bearer token or as a password opens nothing."""
    assert (await request(client, "LOCK", "/state/lab/lock", RIGHT["basic"])).status == 200
    attempts = {
        "query": ({}, {"ID": LOCK_ID}),
        "bearer": ({"Authorization": f"Bearer {LOCK_ID}"}, {"ID": LOCK_ID}),
        "password": (basic("alice", LOCK_ID), {}),
        "user": (basic(LOCK_ID, ""), {}),
    }
    for kind, (headers, params) in attempts.items():
        response = await request(client, method, path, headers, **params)
        assert response.status == 401, kind
    # The lock itself is untouched by all that.
    held = await (await client.get("/api/v1/projects/lab", headers=RIGHT["basic"])).json()
    assert held["lock"]["info"]["ID"] == LOCK_ID


@pytest.mark.parametrize(("method", "path"), PUBLIC, ids=route_ids(PUBLIC))
async def test_probes_answer_whatever_the_credentials(client: Client, method: str, path: str) -> None:
    """/healthz and /readyz need no credentials, and wrong ones do not make them fail."""
    for kind, headers in {**WRONG, **RIGHT}.items():
        response = await request(client, method, path, headers)
        assert response.status == 200, kind


@pytest.mark.parametrize("path", sorted(PROBE_PATHS))
async def test_probes_need_no_auth_and_reveal_nothing(client: Client, path: str) -> None:
    """The probes answer without credentials with a status and the names of the checks only."""
    response = await client.get(path)
    body = await response.json()
    assert (response.status, body["status"]) == (200, "ok")
    assert set(body) <= {"status", "checks"}
    assert all(verdict == "ok" for verdict in body.get("checks", {}).values())


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_metrics_are_open_only_when_metrics_auth_is_off(
    make_client: MakeClient, settings: ServerSettings, method: str
) -> None:
    """metrics_auth = false serves /metrics to anyone; every other route still needs auth."""
    client = await make_client(settings.model_copy(update={"metrics_auth": False}))
    assert (await client.request(method, METRICS_PATH)).status == 200
    assert (await client.request(method, METRICS_PATH, headers=WRONG["wrong-token"])).status == 200
    for other_method, path in PROTECTED:
        if path != METRICS_PATH:
            assert (await request(client, other_method, path, {})).status == 401, f"{other_method} {path}"


# ---- Credentials that cannot be decoded ---------------------------------------------------------


async def raw_get(client: Client, authorization: bytes) -> int:
    """GET /api/v1/vms with an Authorization header of raw bytes (no client would encode them)."""
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET /api/v1/vms HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: "
            + authorization
            + b"\r\n\r\n"
        )
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer tök".encode(), id="utf8-bearer"),
        pytest.param(b"Basic " + base64.b64encode("alice:wröng".encode()), id="utf8-password"),
        pytest.param(b"Basic " + base64.b64encode(b"alice:\xff"), id="undecodable-password"),
    ],
)
async def test_non_ascii_credentials_are_401(client: Client, authorization: bytes) -> None:
    """Credentials that decode to non-ASCII text are simply wrong."""
    assert await raw_get(client, authorization) == 401


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Basic é".encode(), id="non-ascii-basic"),
        pytest.param(b"Basic \xff\xfe", id="undecodable-basic"),
        pytest.param(b"Bearer \xff", id="undecodable-bearer"),
    ],
)
async def test_undecodable_credentials_are_401(client: Client, authorization: bytes) -> None:
    """An Authorization header that is not ASCII base64 or UTF-8 is a 401, never a 500."""
    assert await raw_get(client, authorization) == 401
