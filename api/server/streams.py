"""What long-lived responses (watches, console follows) share: one wake-up signal for store
commits, a bound on how many may be open, and an end at server shutdown.

One hub per application, made on first use (so an app built without install_streams works
too). Commits of this process arrive through `Database.subscribe`; commits of another process on
the same data dir (split mode: `tofu-qemu api` + `tofu-qemu controller`) through `PRAGMA
data_version`, polled every POLL_SECONDS by one task the hub owns while any stream is open
(started by the first, cancelled and awaited by the last). `close()` (on_shutdown, see
install_streams) wakes every stream to end it, so aiohttp's shutdown never waits its full
timeout for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from enum import StrEnum

from aiohttp import web

from api.server.keys import DATABASE
from api.store import Database

POLL_SECONDS = 1.0
STREAMS_MAX = {"watch": 100, "follow": 32}
_HUBS: weakref.WeakKeyDictionary[web.Application, StreamHub] = weakref.WeakKeyDictionary()


class StreamKind(StrEnum):
    WATCH = "watch"
    FOLLOW = "follow"


class TooManyStreams(Exception):
    """STREAMS_MAX of this kind are open: 429, try again later."""


class ShuttingDown(Exception):
    """The server is stopping: 503."""


class StreamHub:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._changed = asyncio.Event()
        self.closing = False
        self._open = dict.fromkeys(StreamKind, 0)
        self._poller: asyncio.Task[None] | None = None
        db.subscribe(self._notify)

    def changed(self) -> asyncio.Event:
        """An event set at the next commit (or at close). Take it *before* reading the store,
        so that a commit between the read and the wait is not missed."""
        return self._changed

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Refuse new streams and wake the open ones, which see `closing` and end."""
        self.closing = True
        self._notify()

    def open_count(self, kind: StreamKind) -> int:
        return self._open[kind]

    @contextlib.asynccontextmanager
    async def slot(self, kind: StreamKind) -> AsyncIterator[None]:
        """Hold one of the STREAMS_MAX places of `kind` for the body.

        :raise TooManyStreams: all are taken.
        :raise ShuttingDown: the server is stopping.
        """
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if self._open[kind] >= STREAMS_MAX[kind]:
            raise TooManyStreams(f"{STREAMS_MAX[kind]} {kind} streams are open; try again later")
        self._open[kind] += 1
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_data_version(), name="stream-hub-poller")
        try:
            yield
        finally:
            self._open[kind] -= 1
            if not any(self._open.values()) and self._poller is not None:
                poller, self._poller = self._poller, None
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller

    async def _poll_data_version(self) -> None:
        """Wake the streams when another process commits. SQLite reads never wait on writers in
        WAL mode, and the connection has a busy timeout, so these queries cannot hang."""
        last = await self._db.data_version()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            current = await self._db.data_version()
            if current != last:
                last = current
                self._notify()


def hub_of(app: web.Application) -> StreamHub:
    """The app's hub, made on first use (app state cannot be set once the app runs)."""
    hub = _HUBS.get(app)
    if hub is None:
        hub = _HUBS[app] = StreamHub(app[DATABASE])
    return hub


def install_streams(app: web.Application) -> None:
    """End open streams at shutdown. Without it they still end, but only when aiohttp cancels
    them after its shutdown timeout (60 s by default)."""

    async def close_streams(app: web.Application) -> None:
        hub = _HUBS.get(app)
        if hub is not None:
            hub.close()

    app.on_shutdown.append(close_streams)
