"""Connection limits of the HTTP listeners, so that no client can use up the process's files.

Every accepted connection holds a file descriptor, and so do the store, QEMU's sockets and the
controller's reads of /proc and the run dir. Without limits, a thousand connections that send
half a request header and stop would take them all (and hold them for an hour: aiohttp's
default keep-alive timeout). Here:

- A new connection must send its first request header within `header_timeout_seconds`; an idle
  one, or one slow to send its next request, is closed after `keepalive_timeout_seconds`
  (aiohttp's keep-alive timer); a request body must arrive within `body_timeout_seconds` (408).
- At most `max_connections` are open, and at most half the open-file limit (CAP_SHARE_OF_FILES),
  which leaves the other half to the controller and the store.
- At the cap, a new connection does not wait and is not refused while a connection is idle: the
  one idle longest (it never sent a full request header, or finished its last answer more than
  SERVED_IDLE_GRACE_SECONDS ago) is closed for it. So a flood of half-open connections cannot
  shut out a probe: /healthz is answered unless every open connection is in a request. When
  all are, the new one gets a 503 Status and is closed.

`GuardedSite` is the TCP listener with these limits; the app's middleware (`serving`) tells the
guard which connections are in a request. Behind TLS the handshake must also finish within
`header_timeout_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from api.infra.metrics import Metrics
from api.server.errors import Handler, status_body, status_response
from api.settings import ServerSettings

log = structlog.get_logger(__name__)
CAP_SHARE_OF_FILES = 2  # connections take at most 1/CAP_SHARE_OF_FILES of RLIMIT_NOFILE
SERVED_IDLE_GRACE_SECONDS = 0.5
BUSY_MESSAGE = "every connection slot is in a request; try again later"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float
    keepalive_timeout: float
    body_timeout: float

    @classmethod
    def of(cls, settings: ServerSettings | None = None) -> ConnectionLimits:
        """The limits `settings` set (their defaults without)."""
        settings = settings or ServerSettings()
        return cls(
            max_connections=settings.max_connections,
            header_timeout=settings.header_timeout_seconds,
            keepalive_timeout=settings.keepalive_timeout_seconds,
            body_timeout=settings.body_timeout_seconds,
        )


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (1024 is a common soft default, far below
    what a server with many VMs and clients needs). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as err:
            log.warning("open_file_limit_not_raised", soft=soft, hard=hard, error=str(err))
            return soft
    return hard if hard != resource.RLIM_INFINITY else soft


def connection_cap(max_connections: int, open_files: int) -> int:
    """How many connections may be open: the setting, within the share of the file limit."""
    return max(1, min(max_connections, open_files // CAP_SHARE_OF_FILES))


def busy_answer() -> bytes:
    """The whole HTTP answer to a connection refused at the cap (nothing of it has been read)."""
    body = json.dumps(status_body(503, BUSY_MESSAGE)).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@dataclass(slots=True)
class _Connection:
    idle_since: float
    served: bool = False
    busy: int = 0
    header_deadline: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class ConnectionGuard:
    """Which connections of one listener are open, idle or in a request; see the module doc."""

    limits: ConnectionLimits
    listener: str
    metrics: Metrics
    cap: int = 0  # 0: from max_connections and the open-file limit now in force
    clock: Callable[[], float] = time.monotonic
    _open: OrderedDict[asyncio.BaseTransport, _Connection] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not self.cap:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            self.cap = connection_cap(self.limits.max_connections, soft)
        self.metrics.http_connections.labels(listener=self.listener).set(0)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Take `transport` in, closing the longest idle connection if at the cap. False: every
        open connection is in a request; the caller refuses this one."""
        if len(self._open) >= self.cap and not self._evict_one():
            self._closed("refused")
            return False
        connection = _Connection(idle_since=self.clock())
        connection.header_deadline = asyncio.get_running_loop().call_later(
            self.limits.header_timeout, self._header_deadline, transport
        )
        self._open[transport] = connection
        self._gauge()
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        connection = self._open.pop(transport, None)
        if connection is not None and connection.header_deadline is not None:
            connection.header_deadline.cancel()
        self._gauge()

    @contextlib.contextmanager
    def serving(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Mark the connection as in a request for the body (unknown transports are ignored)."""
        connection = self._open.get(transport) if transport is not None else None
        if connection is None or transport is None:
            yield
            return
        connection.busy += 1
        connection.served = True
        if connection.header_deadline is not None:
            connection.header_deadline.cancel()
            connection.header_deadline = None
        try:
            yield
        finally:
            connection.busy -= 1
            connection.idle_since = self.clock()
            if transport in self._open:
                self._open.move_to_end(transport)

    def middleware(self) -> Middleware:
        """The app's outermost middleware: the connection is in a request while it runs."""

        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            with self.serving(request.transport):
                return await handler(request)

        return track

    def _evict_one(self) -> bool:
        now = self.clock()
        for transport, connection in self._open.items():
            idle = connection.busy == 0 and (
                not connection.served or now - connection.idle_since >= SERVED_IDLE_GRACE_SECONDS
            )
            if idle and _write_buffer_size(transport) == 0:
                self._close(transport, "evicted")
                return True
        return False

    def _header_deadline(self, transport: asyncio.BaseTransport) -> None:
        connection = self._open.get(transport)
        if connection is not None and not connection.served:
            connection.header_deadline = None
            self._close(transport, "header_timeout")

    def _close(self, transport: asyncio.BaseTransport, reason: str) -> None:
        self.release(transport)
        transport.close()
        self._closed(reason)

    def _closed(self, reason: str) -> None:
        self.metrics.http_connections_closed_total.labels(listener=self.listener, reason=reason).inc()

    def _gauge(self) -> None:
        self.metrics.http_connections.labels(listener=self.listener).set(len(self._open))


CONNECTION_GUARD = web.AppKey("connection_guard", ConnectionGuard)


def _write_buffer_size(transport: asyncio.BaseTransport) -> int:
    return transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's admission."""

    def __init__(self, inner: web.RequestHandler, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.admit(transport):
            self._transport = transport
            self._inner.connection_made(transport)
            return
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(busy_answer())
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.release(self._transport)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> None:
        if self._transport is not None:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP listener like web.TCPSite whose connections pass through `guard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._guarded_runner = runner
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._guarded_runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        guard = self._guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _GuardedProtocol(server(), guard),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=guard.limits.header_timeout if self._ssl_context else None,
            reuse_address=True,
        )


def body_deadline(seconds: float) -> Middleware:
    """Read a request's body (aiohttp keeps it for the handler) within `seconds`, or answer 408.
    Runs after auth, so only a client allowed in can make the server wait for a body."""

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(seconds):
                    await request.read()
            except TimeoutError:
                answer = status_response(408, f"the request body did not arrive within {seconds:g} s")
                answer.force_close()  # the rest of the body may still come: not a next request
                return answer
        return await handler(request)

    return read_body_in_time
