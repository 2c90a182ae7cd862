"""The stream hub's poller outlives a failing store look (api/server/streams.py): open watches
keep hearing other processes' commits once the store answers again."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

import pytest

from api.server import streams
from api.server.streams import StreamHub, StreamKind, stream_limits
from api.settings import ServerSettings


class FlakyVersions:
    """data_version: 1, then a failure, then 2 (another process committed meanwhile)."""

    def __init__(self) -> None:
        self.answers: list[int | Exception] = [1, sqlite3.OperationalError("disk I/O error"), 2]
        self.asked = 0

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass

    async def data_version(self) -> int:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_a_failed_look_is_retried_and_the_streams_are_woken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "POLL_SECONDS", 0.001)
    store = FlakyVersions()
    hub = StreamHub(store, stream_limits(ServerSettings()))  # type: ignore[arg-type]
    async with hub.slot(StreamKind.WATCH):
        changed = hub.changed()
        await asyncio.wait_for(changed.wait(), 5)
        assert store.asked >= 3
