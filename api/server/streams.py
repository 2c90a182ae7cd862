"""What long-lived responses (watches, console follows) share: one wake-up signal for store
commits, bounds on how many may be open (in all, and per authenticated principal: one user or
token cannot take every place), and an end at server shutdown. The bounds are settings
(max_watches, max_watches_per_principal, max_follows, max_follows_per_principal); without
credentials there are no principals, only the bound in all.

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
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

import structlog
from aiohttp import web

from api.server.keys import DATABASE, SETTINGS
from api.settings import ServerSettings
from api.store import Database
from api.store.sql import FAILURES

POLL_SECONDS = 1.0

log = structlog.get_logger(__name__)
_HUBS: weakref.WeakKeyDictionary[web.Application, StreamHub] = weakref.WeakKeyDictionary()


class StreamKind(StrEnum):
    WATCH = "watch"
    FOLLOW = "follow"


@dataclass(frozen=True, slots=True)
class StreamLimit:
    total: int
    per_principal: int


def stream_limits(settings: ServerSettings) -> dict[StreamKind, StreamLimit]:
    return {
        StreamKind.WATCH: StreamLimit(settings.max_watches, settings.max_watches_per_principal),
        StreamKind.FOLLOW: StreamLimit(settings.max_follows, settings.max_follows_per_principal),
    }


class TooManyStreams(Exception):
    """As many streams of this kind as allowed are open (in all, or for this principal): 429."""


class ShuttingDown(Exception):
    """The server is stopping: 503."""


class StreamHub:
    def __init__(self, db: Database, limits: dict[StreamKind, StreamLimit]) -> None:
        self._db = db
        self._limits = limits
        self._changed = asyncio.Event()
        self.closing = False
        self._open = dict.fromkeys(StreamKind, 0)
        self._by_principal: Counter[tuple[StreamKind, str]] = Counter()
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
    async def slot(self, kind: StreamKind, principal: str | None = None) -> AsyncIterator[None]:
        """Hold one of the places of `kind` (and of `principal`'s, when authenticated) for the body.

        :raise TooManyStreams: all are taken.
        :raise ShuttingDown: the server is stopping.
        """
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        limit = self._limits[kind]
        if self._open[kind] >= limit.total:
            raise TooManyStreams(f"{limit.total} {kind} streams are open; try again later")
        key = (kind, principal or "")
        if principal is not None and self._by_principal[key] >= limit.per_principal:
            raise TooManyStreams(
                f"{principal!r} has {limit.per_principal} {kind} streams open, the most one may; "
                "close one or try again later"
            )
        self._open[kind] += 1
        self._by_principal[key] += 1
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_data_version(), name="stream-hub-poller")
        try:
            yield
        finally:
            self._open[kind] -= 1
            self._by_principal[key] -= 1
            if not self._by_principal[key]:
                del self._by_principal[key]
            if not any(self._open.values()) and self._poller is not None:
                poller, self._poller = self._poller, None
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller

    async def _poll_data_version(self) -> None:
        """Wake the streams when another process commits. SQLite reads never wait on writers in
        WAL mode, and the connection has a busy timeout, so these queries cannot hang. A failed
        look (the store briefly unreachable) is logged and retried: a poller that died would
        leave every open watch deaf to the other process's commits until the streams closed."""
        last: int | None = None
        failing = False
        while True:
            try:
                current = await self._db.data_version()
            except (*FAILURES, OSError) as err:
                if not failing:
                    log.warning("stream_poll_failed", error=str(err) or type(err).__name__)
                failing = True
            else:
                if failing:
                    log.info("stream_poll_recovered")
                    self._notify()  # a commit may have gone by unseen meanwhile
                elif last is not None and current != last:
                    self._notify()
                last, failing = current, False
            await asyncio.sleep(POLL_SECONDS)


def hub_of(app: web.Application) -> StreamHub:
    """The app's hub, made on first use (app state cannot be set once the app runs)."""
    hub = _HUBS.get(app)
    if hub is None:
        settings = app.get(SETTINGS) or ServerSettings()
        hub = _HUBS[app] = StreamHub(app[DATABASE], stream_limits(settings))
    return hub


def install_streams(app: web.Application) -> None:
    """End open streams at shutdown. Without it they still end, but only when aiohttp cancels
    them after its shutdown timeout (60 s by default)."""

    async def close_streams(app: web.Application) -> None:
        hub = _HUBS.get(app)
        if hub is not None:
            hub.close()

    app.on_shutdown.append(close_streams)
