"""Liveness and readiness probes. They need no auth, so they reveal only check names and short
reasons; a readiness check must never put a secret or a path in its reason.

/healthz answers while the event loop runs. /readyz answers 200 only when the store takes a
write transaction and every check registered under READINESS_CHECKS passes (run by
api/infra/health.py: concurrently, each within its timeout).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from api.infra.health import ReadinessCheck, run_checks
from api.server.errors import status_response
from api.server.keys import DATABASE, METRICS
from api.store import Database, StoreUnavailable
from api.store.metrics import attach_store_metrics
from api.store.sql import FAILURES

log = structlog.get_logger(__name__)

READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, ReadinessCheck])
DATABASE_CHECK = "database"
STORE_DOWN = "the store's database cannot be reached"


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    results = await run_checks(request.app[READINESS_CHECKS].copy())
    failed = {name: reason for name, reason in results.items() if reason is not None}
    report = {name: reason or "ok" for name, reason in results.items()}
    if not failed:
        return web.json_response({"status": "ok", "checks": report})
    message = "not ready: " + "; ".join(f"{name}: {reason}" for name, reason in failed.items())
    # The error body every route answers with (a Status object), plus which checks failed and why.
    body = json.loads(status_response(503, message).text or "{}")
    return web.json_response({**body, "failed": failed, "checks": report}, status=503)


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
        except StoreUnavailable as err:
            # The driver's text may name the database's address; probes need no credentials.
            log.warning("readiness_store_unavailable", error=str(err))
            return STORE_DOWN
        except (*FAILURES, ValueError) as err:
            # ValueError: aiosqlite's answer once the connection is closed.
            return f"not writable: {err}"
        return None


async def database_check_context(app: web.Application) -> AsyncIterator[None]:
    """Register the store's writability check and export its gauges; runs after app[DATABASE]
    is set."""
    attach_store_metrics(app[METRICS], app[DATABASE])
    probe = WritableProbe(app[DATABASE])
    app[READINESS_CHECKS][DATABASE_CHECK] = probe.check
    yield
    app[READINESS_CHECKS].pop(DATABASE_CHECK, None)
    await probe.close()
