"""Liveness and readiness probes. They need no auth, so they reveal nothing but "ok"."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api.server.errors import status_response
from api.server.keys import DATABASE

READY_TIMEOUT_SECONDS = 2.0


async def healthz(_request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            await request.app[DATABASE].read("SELECT 1")
    except (TimeoutError, OSError, ValueError):
        return status_response(503, "not ready")
    return web.json_response({"status": "ok"})
