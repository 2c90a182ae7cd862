"""The stale-lock publisher outlives a failing store (api/server/app.py): one scan that fails
with a store error is logged, and the next one publishes."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

from aiohttp import web

from api.server.app import _publish_stale_locks_forever
from api.server.keys import SETTINGS, STATES
from api.settings import ServerSettings


class FlakyStates:
    def __init__(self) -> None:
        self.scans = 0
        self.published = asyncio.Event()

    async def publish_stale_locks(self, max_age: timedelta) -> list[str]:
        self.scans += 1
        if self.scans == 1:
            raise sqlite3.OperationalError("database is locked")
        self.published.set()
        return ["lab"]


async def test_a_failed_scan_does_not_end_the_publisher() -> None:
    app = web.Application()
    app[SETTINGS] = ServerSettings(lock_publish_after=0.004)  # a scan every millisecond
    states = FlakyStates()
    app[STATES] = states  # type: ignore[misc]
    task = asyncio.create_task(_publish_stale_locks_forever(app))
    try:
        await asyncio.wait_for(states.published.wait(), 5)
    finally:
        task.cancel()
    assert states.scans >= 2
