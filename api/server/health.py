"""Liveness and readiness probes. They need no auth, so they reveal only check names and short
reasons; a readiness check must never put a secret or a path in its reason.

/healthz answers while the event loop runs. /readyz answers 200 only when the store takes a
write transaction and every check registered under READINESS_CHECKS passes, each within
CHECK_TIMEOUT_SECONDS; checks run concurrently, so one that hangs costs no more than that.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from api.server.errors import status_response
from api.server.keys import DATABASE, METRICS
from api.store import Database
from api.store.sql import FAILURES

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""A readiness check: None when fine, else a short reason. It may be cancelled on timeout."""

READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, ReadinessCheck])
DATABASE_CHECK = "database"
CHECK_TIMEOUT_SECONDS = 2.0


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    checks = request.app[READINESS_CHECKS].copy()
    reasons = await asyncio.gather(*(_run_check(name, check) for name, check in checks.items()))
    results = dict(zip(checks, reasons, strict=True))
    failed = {name: reason for name, reason in results.items() if reason is not None}
    report = {name: reason or "ok" for name, reason in results.items()}
    if not failed:
        return web.json_response({"status": "ok", "checks": report})
    message = "not ready: " + "; ".join(f"{name}: {reason}" for name, reason in failed.items())
    # The error body every route answers with (a Status object), plus which checks failed and why.
    body = json.loads(status_response(503, message).text or "{}")
    return web.json_response({**body, "failed": failed, "checks": report}, status=503)


async def _run_check(name: str, check: ReadinessCheck) -> str | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return await check()
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
    except Exception as err:
        # A check is someone else's code: its bug makes the process not ready, not the probe fail.
        log.exception("readiness_check_crashed", check=name)
        return f"check failed: {type(err).__name__}"


class WritableProbe:
    """Whether the store can take its write lock now (Database.probe_writable).

    A probe is never cancelled by its caller's timeout: a cancelled BEGIN IMMEDIATE is only
    rolled back once SQLite's busy timeout (10 s) ends, and /readyz must answer within its own
    deadline. So a probe that outlives the deadline runs on, and later calls share it instead
    of queueing more behind it.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._running: asyncio.Task[str | None] | None = None

    async def check(self) -> str | None:
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._probe(), name="database-writable-probe")
        return await asyncio.shield(self._running)

    async def close(self) -> None:
        """Wait for a probe still running (at most SQLite's busy timeout)."""
        if self._running is not None:
            await self._running

    async def _probe(self) -> str | None:
        try:
            await self._db.probe_writable()
        except (*FAILURES, ValueError) as err:
            # ValueError: aiosqlite's answer once the connection is closed.
            return f"not writable: {err}"
        return None


async def database_check_context(app: web.Application) -> AsyncIterator[None]:
    """Register the store's writability check and export its gauges; runs after app[DATABASE]
    is set."""
    app[METRICS].attach_store(app[DATABASE])
    probe = WritableProbe(app[DATABASE])
    app[READINESS_CHECKS][DATABASE_CHECK] = probe.check
    yield
    app[READINESS_CHECKS].pop(DATABASE_CHECK, None)
    await probe.close()
