"""Authentication on every route: only valid credentials pass, except the probes."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

Client = TestClient[Any, Any]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


ROUTES = [
    ("GET", "/state/lab"),
    ("POST", "/state/lab"),
    ("PUT", "/state/lab"),
    ("DELETE", "/state/lab"),
    ("LOCK", "/state/lab/lock"),
    ("UNLOCK", "/state/lab/lock"),
    ("POST", "/state/lab/lock"),
    ("DELETE", "/state/lab/lock"),
    ("GET", "/api/v1/projects"),
    ("GET", "/api/v1/projects/lab"),
    ("GET", "/api/v1/projects/lab/states"),
    ("GET", "/api/v1/projects/lab/states/1"),
    ("GET", "/api/v1/vms"),
    ("GET", "/api/v1/projects/lab/vms"),
    ("GET", "/api/v1/projects/lab/vms/web"),
]
CREDENTIALS = {
    "none": {},
    "wrong-password": basic("alice", "wrong"),
    "unknown-user": basic("mallory", "s3cret"),
    "wrong-token": {"Authorization": "Bearer tok-2"},
    "garbage": {"Authorization": "Basic !!!"},
    "lock-id-is-no-credential": {"Authorization": "Bearer id-1"},
}


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
@pytest.mark.parametrize("credentials", CREDENTIALS.values(), ids=CREDENTIALS.keys())
async def test_every_route_needs_valid_credentials(
    client: Client, method: str, path: str, credentials: dict[str, str]
) -> None:
    """Without valid credentials every route answers 401 with a Basic challenge and JSON."""
    response = await client.request(method, path, headers=credentials, data=b'{"ID": "id-1"}')
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert (await response.json())["code"] == 401


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
@pytest.mark.parametrize(
    "credentials", [basic("alice", "s3cret"), {"Authorization": "Bearer tok-1"}], ids=["basic", "bearer"]
)
async def test_every_route_accepts_valid_credentials(
    client: Client, method: str, path: str, credentials: dict[str, str]
) -> None:
    """With valid Basic or bearer credentials no route answers 401."""
    response = await client.request(method, path, headers=credentials, data=b'{"ID": "id-1"}')
    assert response.status != 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_need_no_auth_and_reveal_nothing(client: Client, path: str) -> None:
    """The probes answer without credentials with a status and the names of the checks only."""
    response = await client.get(path)
    body = await response.json()
    assert (response.status, body["status"]) == (200, "ok")
    assert set(body) <= {"status", "checks"}
    assert all(verdict == "ok" for verdict in body.get("checks", {}).values())
