"""Authentication under attack, over real HTTP on loopback: scrypt runs off the event loop, good
credentials are remembered, failures are throttled per address and per user, logged without
the secret and counted (api/server/auth.py)."""

from __future__ import annotations

import asyncio
import base64
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from api.infra.credentials import Credentials, hash_password, load_credentials
from api.server import create_app
from api.server.auth import AUTHENTICATOR, VERIFIED_TTL_SECONDS, Authenticator
from api.server.keys import METRICS
from api.settings import ServerSettings

Client = TestClient[Any, Any]
ServerFactory = Callable[..., Awaitable[TestServer]]
ClientFactory = Callable[..., Awaitable[Client]]
PROTECTED = "/api/v1/vms"
ATTACKERS = 32
PROBES = 40
HEALTHZ_P50_MAX_SECONDS = 0.020


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def hashed_credentials(tmp_path: Path) -> Credentials:
    """A users file, as production has: every check is one scrypt (about 50 ms of CPU)."""
    users_file = tmp_path / "users.toml"
    users_file.write_text(
        f'[users]\nalice = "{hash_password("s3cret")}"\n[tokens]\nci = "{hash_password("the-token")}"\n'
    )
    return load_credentials(users=None, tokens=None, users_file=users_file)


def replace_authenticator(app: web.Application, credentials: Credentials, **options: Any) -> Authenticator:
    """The app's authenticator, remade with a test clock or limits (before the app starts)."""
    app[AUTHENTICATOR].close()
    authenticator = Authenticator(credentials, metrics=app[METRICS], **options)
    app[AUTHENTICATOR] = authenticator
    return authenticator


async def wrong_tokens_until(stop: asyncio.Event, url: str, source: str, refused: list[int]) -> None:
    """One attacker, from its own loopback address, sending wrong tokens back to back."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            async with session.get(url, headers={"Authorization": f"Bearer wrong-{source}"}) as response:
                await response.read()
                refused.append(response.status)


async def test_healthz_stays_fast_while_32_clients_send_wrong_tokens(
    aiohttp_server: ServerFactory, settings: ServerSettings, tmp_path: Path
) -> None:
    """32 clients, each from its own loopback address (so none is throttled yet), keep the
    scrypt pool busy with wrong tokens; /healthz still answers with a median under 20 ms.
    With scrypt on the event loop every probe waited behind 50 ms checks (/readyz took 3 s)."""
    server = await aiohttp_server(create_app(settings, credentials=hashed_credentials(tmp_path)))
    base = f"http://127.0.0.1:{server.port}"
    stop = asyncio.Event()
    statuses: list[int] = []
    latencies: list[float] = []
    async with asyncio.TaskGroup() as attackers:
        for index in range(ATTACKERS):
            source = f"127.0.0.{index + 2}"
            attackers.create_task(wrong_tokens_until(stop, base + PROTECTED, source, statuses))
        await asyncio.sleep(0.5)  # every attacker has a check in the pool or waiting for it
        async with aiohttp.ClientSession() as probe:
            for _ in range(PROBES):
                started = time.perf_counter()
                async with probe.get(base + "/healthz") as response:
                    await response.read()
                    assert response.status == 200
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
            async with probe.get(base + "/readyz") as response:
                assert response.status == 200
        stop.set()
    p50 = statistics.median(latencies)
    assert p50 < HEALTHZ_P50_MAX_SECONDS, f"p50 {p50 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    assert statuses.count(401) >= ATTACKERS, "the wrong tokens were really being checked meanwhile"
    assert 429 not in statuses


async def test_one_address_is_throttled_after_30_failures(
    aiohttp_client: ClientFactory, settings: ServerSettings
) -> None:
    """The 31st failure within the burst is a 429 JSON Status with Retry-After, and runs no check;
    a client already in (its credentials cached) is not locked out; one more try every 2 s."""
    credentials = load_credentials(users="alice:s3cret,bob:b0b", tokens=None, users_file=None)
    app = create_app(settings, credentials=credentials)
    ticks = Ticks()
    replace_authenticator(app, credentials, clock=ticks)
    client = await aiohttp_client(app)
    assert (await client.get(PROTECTED, headers=basic("alice", "s3cret"))).status == 200
    for attempt in range(30):
        user = f"user-{attempt % 3}"  # below the per-user limit: this is the address's
        assert (await client.get(PROTECTED, headers=basic(user, "wrong"))).status == 401, attempt
    refused = await client.get(PROTECTED, headers=basic("bob", "b0b"))
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "2"
    body = await refused.json()
    assert (body["kind"], body["code"], body["reason"]) == ("Status", 429, "TooManyRequests")
    assert "retry in 2 s" in body["message"]
    assert (await client.get(PROTECTED, headers=basic("alice", "s3cret"))).status == 200
    ticks.now += 2
    assert (await client.get(PROTECTED, headers=basic("bob", "b0b"))).status == 200


@pytest.mark.parametrize("user", ["alice", "mallory"], ids=["known", "unknown"])
async def test_one_user_is_throttled_after_10_failures_known_or_not(
    aiohttp_client: ClientFactory, settings: ServerSettings, user: str
) -> None:
    """From all addresses together; an unknown name is throttled exactly as a known one, so the
    throttle does not tell which exist either. Other users are not affected."""
    credentials = load_credentials(users="alice:s3cret,bob:b0b", tokens=None, users_file=None)
    app = create_app(settings, credentials=credentials)
    ticks = Ticks()
    replace_authenticator(app, credentials, clock=ticks)
    client = await aiohttp_client(app)
    for attempt in range(10):
        assert (await client.get(PROTECTED, headers=basic(user, f"guess-{attempt}"))).status == 401
    refused = await client.get(PROTECTED, headers=basic(user, "s3cret"))
    assert (refused.status, refused.headers["Retry-After"]) == (429, "6")
    assert (await client.get(PROTECTED, headers=basic("bob", "b0b"))).status == 200
    ticks.now += 6
    expected = 200 if user == "alice" else 401
    assert (await client.get(PROTECTED, headers=basic(user, "s3cret"))).status == expected


async def test_a_verified_credential_is_checked_once_per_ttl(
    aiohttp_client: ClientFactory, settings: ServerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Terraform sends credentials with every request: only the first pays for scrypt, until the
    credential has not been used for VERIFIED_TTL_SECONDS. A wrong one is never cached."""
    credentials = hashed_credentials(tmp_path)
    checks: list[str] = []
    check = credentials.check_basic

    def counted(username: str, password: str) -> str | None:
        checks.append(username)
        return check(username, password)

    monkeypatch.setattr(credentials, "check_basic", counted)
    app = create_app(settings, credentials=credentials)
    ticks = Ticks()
    replace_authenticator(app, credentials, clock=ticks)
    client = await aiohttp_client(app)
    for _ in range(5):
        assert (await client.get(PROTECTED, headers=basic("alice", "s3cret"))).status == 200
        ticks.now += VERIFIED_TTL_SECONDS - 1
    assert checks == ["alice"]
    for _ in range(2):
        assert (await client.get(PROTECTED, headers=basic("alice", "wrong"))).status == 401
    assert checks == ["alice"] * 3
    ticks.now += VERIFIED_TTL_SECONDS
    assert (await client.get(PROTECTED, headers=basic("alice", "s3cret"))).status == 200
    assert checks == ["alice"] * 4
    assert VERIFIED_TTL_SECONDS == 300


async def test_too_many_checks_waiting_is_429(
    aiohttp_client: ClientFactory, settings: ServerSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past pending_max checks in the pool, a new one is refused at once instead of queueing."""
    credentials = hashed_credentials(tmp_path)
    release = threading.Event()

    def stuck(username: str, password: str) -> str | None:
        release.wait(10)
        return None

    monkeypatch.setattr(credentials, "check_basic", stuck)
    app = create_app(settings, credentials=credentials)
    replace_authenticator(app, credentials, pending_max=1)
    client = await aiohttp_client(app)
    first = asyncio.create_task(client.get(PROTECTED, headers=basic("alice", "one")))
    await asyncio.sleep(0.2)
    busy = await client.get(PROTECTED, headers=basic("alice", "two"))
    assert (busy.status, busy.headers["Retry-After"]) == (429, "1")
    assert "being checked" in (await busy.json())["message"]
    release.set()
    assert (await first).status == 401


def failures(text: str, reason: str) -> float:
    line = f'tofu_qemu_auth_failures_total{{reason="{reason}"}} '
    return next(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))


async def test_failures_are_logged_without_the_secret_and_counted(
    aiohttp_client: ClientFactory, settings: ServerSettings
) -> None:
    credentials = load_credentials(users="alice:s3cret", tokens=None, users_file=None)
    client = await aiohttp_client(create_app(settings, credentials=credentials))
    with capture_logs() as logs:
        assert (await client.get(PROTECTED, headers=basic("alice", "hunter2-wrong"))).status == 401
        assert (await client.get(PROTECTED, headers={"Authorization": "Bearer hunter2-token"})).status == 401
        assert (await client.get(PROTECTED, headers={"Authorization": "Basic !!hunter2"})).status == 401
        assert (await client.get(PROTECTED)).status == 401  # no credentials: not a failed attempt
    failed = [entry for entry in logs if entry["event"] == "auth_failed"]
    assert [(e["reason"], e.get("scheme"), e.get("user"), e["client"]) for e in failed] == [
        ("invalid", "basic", "alice", "127.0.0.1"),
        ("invalid", "bearer", None, "127.0.0.1"),
        ("malformed", None, None, "127.0.0.1"),
    ]
    assert {(e["method"], e["path"], e["log_level"]) for e in failed} == {("GET", PROTECTED, "warning")}
    assert "hunter2" not in repr(logs)
    metrics = await (await client.get("/metrics", headers=basic("alice", "s3cret"))).text()
    assert (failures(metrics, "invalid"), failures(metrics, "malformed")) == (2, 1)
    assert (failures(metrics, "throttled"), failures(metrics, "busy")) == (0, 0)


async def test_a_throttling_is_logged_once_and_every_refusal_counted(
    aiohttp_client: ClientFactory, settings: ServerSettings
) -> None:
    credentials = load_credentials(users="alice:s3cret", tokens="tok", users_file=None)
    app = create_app(settings, credentials=credentials)
    replace_authenticator(app, credentials, clock=Ticks())
    client = await aiohttp_client(app)
    with capture_logs() as logs:
        for _ in range(13):
            await client.get(PROTECTED, headers=basic("alice", "wrong"))
    assert [e["event"] for e in logs].count("auth_failed") == 10
    throttled = [e for e in logs if e["event"] == "auth_throttled"]
    assert [(e["by"], e["user"], e["retry_after"]) for e in throttled] == [("user", "alice", 6)]
    metrics = await (await client.get("/metrics", headers={"Authorization": "Bearer tok"})).text()
    assert failures(metrics, "throttled") == 3
