"""The probes over real HTTP: /readyz runs the store's writability check and every registered one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.infra import health
from api.infra.credentials import load_credentials
from api.infra.health import ReadinessCheck
from api.infra.metrics import Metrics
from api.server import create_app
from api.server.health import READINESS_CHECKS
from api.server.ops import create_ops_app
from api.settings import ServerSettings
from api.store import Database
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH, ClientFactory, FakeClock

Client = TestClient[Any, Any]
Serve = Callable[[Mapping[str, ReadinessCheck]], Awaitable[Client]]
CREDENTIALS = load_credentials(users="alice:s3cret", tokens=None, users_file=None)


@pytest.fixture
def serve(aiohttp_client: ClientFactory, db: Database, clock: FakeClock, settings: ServerSettings) -> Serve:
    async def make(checks: Mapping[str, ReadinessCheck]) -> Client:
        app = create_app(settings, credentials=CREDENTIALS, clock=clock, database=db, readiness_checks=checks)
        return await aiohttp_client(app)

    return make


@pytest.fixture
def blocked_writes(db: Database, hold_write_lock: Callable[[], Callable[[], None]]) -> Callable[[], None]:
    """Another connection holding the store's write lock; call the result to release it."""
    return hold_write_lock()


async def passing() -> str | None:
    return None


async def failing() -> str | None:
    return "work queue stalled"


async def hanging() -> str | None:
    await asyncio.Event().wait()
    return None


async def crashing() -> str | None:
    raise RuntimeError("bug")


async def test_healthz_is_a_bare_ok(serve: Serve) -> None:
    """/healthz answers 200 without credentials and whatever the checks say."""
    client = await serve({"controller": failing})
    response = await client.get("/healthz")
    assert (response.status, await response.json()) == (200, {"status": "ok"})


async def test_ready_lists_every_check(serve: Serve) -> None:
    """All checks passing: 200 naming the store check and every registered one."""
    client = await serve({"controller": passing, "qemu": passing})
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "controller": "ok", "qemu": "ok"},
    }


async def test_a_failing_check_is_503_naming_it(serve: Serve) -> None:
    """A check's reason is reported under `failed`, in the Status body every error uses."""
    client = await serve({"controller": failing, "qemu": passing})
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["failed"] == {"controller": "work queue stalled"}
    assert body["checks"] == {"database": "ok", "controller": "work queue stalled", "qemu": "ok"}
    assert (body["kind"], body["code"], body["reason"]) == ("Status", 503, "ServiceUnavailable")
    assert "controller: work queue stalled" in body["message"]


async def test_a_hanging_check_times_out(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that never answers fails after the check timeout instead of hanging the probe."""
    monkeypatch.setattr(health, "CHECK_TIMEOUT_SECONDS", 0.05)
    client = await serve({"resync": hanging})
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["failed"] == {"resync": "no answer within 0.05s"}


async def test_a_crashing_check_is_a_failure_not_a_500(serve: Serve) -> None:
    """A check that raises makes the process not ready; the probe itself still answers."""
    client = await serve({"qemu": crashing})
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["failed"] == {"qemu": "check failed: RuntimeError"}


async def test_checks_registered_after_start_are_run(serve: Serve) -> None:
    """A component that starts later adds its check to app[READINESS_CHECKS]."""
    client = await serve({})
    client.app[READINESS_CHECKS]["controller"] = failing
    assert (await client.get("/readyz")).status == 503


async def test_a_store_that_cannot_take_writes_is_not_ready(
    serve: Serve, blocked_writes: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another connection holding the write lock past the timeout makes /readyz 503 on `database`."""
    monkeypatch.setattr(health, "CHECK_TIMEOUT_SECONDS", 0.05)
    client = await serve({})
    response = await client.get("/readyz")
    assert response.status == 503
    assert set((await response.json())["failed"]) == {"database"}


async def test_a_timed_out_store_probe_leaves_the_store_writable(
    serve: Serve, blocked_writes: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the other writer is gone, the probe that timed out finishes and writes work again."""
    monkeypatch.setattr(health, "CHECK_TIMEOUT_SECONDS", 0.05)
    client = await serve({})
    assert (await client.get("/readyz")).status == 503
    blocked_writes()
    monkeypatch.setattr(health, "CHECK_TIMEOUT_SECONDS", 5.0)

    assert (await client.get("/readyz")).status == 200
    response = await client.post("/state/lab", data=encode(vm_state(1, {})), headers=AUTH)
    assert response.status == 200


async def test_the_ops_app_serves_only_probes_and_metrics(
    aiohttp_client: ClientFactory, db: Database
) -> None:
    """The controller's ops server answers the probes with its checks, and nothing of the state API."""
    app = create_ops_app(
        metrics=Metrics(),
        database=db,
        credentials=CREDENTIALS,
        metrics_auth=False,
        readiness_checks={"controller": failing},
    )
    client = await aiohttp_client(app)
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert (ready.status, (await ready.json())["failed"]) == (503, {"controller": "work queue stalled"})
    assert (await client.get("/metrics")).status == 200
    assert (await client.get("/state/lab", headers=AUTH)).status == 404
