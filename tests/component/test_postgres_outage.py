"""PostgreSQL stops under a running server: every request is a 503 Status (never a 500), no state
is lost, and once PostgreSQL is back the same server process serves again on its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.infra.health import CHECK_TIMEOUT_SECONDS
from api.server.health import STORE_DOWN
from api.settings import ServerSettings
from api.store import StoreUnavailable
from api.store.postgres import CONNECT_TIMEOUT_SECONDS, open_postgres
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH
from tests.postgres import PostgresCluster

Client = TestClient[Any, Any]
# The pool retries its connections with backoff: the server answers again within this.
RECOVERY_SECONDS = 60.0
NO_ANSWER = f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"


async def until_served(request: Callable[[], Awaitable[int]]) -> float:
    """Seconds until `request` answers 200 (0.8 s here); every answer before that must be a 503."""
    started = time.monotonic()
    while True:
        status = await request()
        if status == 200:
            return time.monotonic() - started
        assert status == 503
        assert time.monotonic() - started < RECOVERY_SECONDS, "the server did not recover"
        await asyncio.sleep(0.2)


async def test_an_outage_is_503_and_the_server_recovers_without_a_restart(
    own_postgres_cluster: PostgresCluster,
    tmp_path: Path,
    make_client: Callable[[ServerSettings], Awaitable[Client]],
) -> None:
    settings = ServerSettings(
        data_dir=tmp_path / "server", database_url=own_postgres_cluster.create_database()
    )
    client = await make_client(settings)
    first = encode(vm_state(1, {"web": {"memory": "64Mi"}}))
    assert (await client.post("/state/lab", data=first, headers=AUTH)).status == 200

    own_postgres_cluster.stop()
    second = encode(vm_state(2, {"web": {"memory": "64Mi"}, "db": {}}))
    attempts = {
        "write": client.post("/state/lab", data=second, headers=AUTH),
        "read": client.get("/state/lab", headers=AUTH),
        "lock": client.request("LOCK", "/state/lab/lock", json={"ID": "x"}, headers=AUTH),
        "list VMs": client.get("/api/v1/projects/lab/vms", headers=AUTH),
    }
    for what, attempt in attempts.items():
        response = await attempt
        body = await response.json()
        assert (response.status, body["kind"], body["code"]) == (503, "Status", 503), what
        assert "database cannot be reached" in body["message"], what
        assert response.headers["Retry-After"] == "5"

    # Writers queue on one lock; the ones behind a failed wait answer at once, not in turn.
    started = time.monotonic()
    writes = [client.post("/state/lab", data=second, headers=AUTH) for _ in range(3)]
    assert [response.status for response in await asyncio.gather(*writes)] == [503, 503, 503]
    assert time.monotonic() - started < 2 * CONNECT_TIMEOUT_SECONDS, "queued writers waited in turn"

    # The probe waits for a connection longer than /readyz waits for it: either reason says the
    # store is down, and neither names the database's address (probes need no credentials).
    ready = await client.get("/readyz")
    report = await ready.json()
    assert ready.status == 503
    assert report["failed"] == {"database": STORE_DOWN} or report["failed"] == {"database": NO_ANSWER}

    own_postgres_cluster.start()
    await until_served(lambda: _status(client.get("/state/lab", headers=AUTH)))
    response = await client.get("/state/lab", headers=AUTH)
    assert await response.read() == first, "the state written before the outage is intact"
    assert (await client.post("/state/lab", data=second, headers=AUTH)).status == 200
    assert await (await client.get("/state/lab", headers=AUTH)).read() == second
    listed = await (await client.get("/api/v1/projects/lab/vms", headers=AUTH)).json()
    assert sorted(item["metadata"]["name"] for item in listed["items"]) == ["db", "web"]
    assert (await client.get("/readyz")).status == 200


async def test_a_server_that_cannot_be_reached_at_start_is_store_unavailable(
    own_postgres_cluster: PostgresCluster,
) -> None:
    """Refused within the connect timeout, with a message that says what is wrong."""
    url = own_postgres_cluster.create_database()
    own_postgres_cluster.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="PostgreSQL server cannot be reached"):
        await open_postgres(url)
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS + 5


async def _status(request: Awaitable[Any]) -> int:
    response = await request
    return int(response.status)
