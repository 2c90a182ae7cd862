"""HTTP for image downloads: a session that connects only where the egress policy allows,
redirects followed by hand (each hop checked, at most MAX_REDIRECTS), a deadline for the
answer's headers, a minimum transfer rate, and failure messages that carry nothing a server
sent.

What a condition may say about a failure is what the spec already says (its URL) and what this
host knows (its settings, its disk); never a redirect target, a status line, a body, a digest
computed from a body, or which of "refused" and "timed out" a connect met (that would map
ports). The exact cause goes to the controller's log as `detail`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import ClassVar

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from api.images import url_problem
from controller.images.egress import AddressRefused, EgressPolicy, GuardedResolver, GuardedSocketFactory

# Redirects one download may follow; more is a loop or a maze, not a mirror.
MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ALLOW_SETTING = "image_fetch_allow_networks"


class DownloadError(Exception):
    """A fetch that did not produce a verified file. `reason` is the condition reason to show,
    the message is safe to show; `detail` (the log's) may name what the server sent.

    Every kind is retried by the cache with backoff; none is worth retrying at once.
    """

    reason: ClassVar[str] = "ImageDownloadFailed"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class DownloadFailed(DownloadError):
    """The server, the network or the local disk failed (HTTP error, timeout, reset, disk full,
    a deadline). A partial file is kept for a resume."""


class DownloadRefused(DownloadFailed):
    """Not allowed or not usable: an address the egress policy refuses, too many redirects, an
    image larger than allowed, an unusable sidecar. Retrying helps only once the source or the
    setting changes. Nothing is kept."""


@dataclass(frozen=True, slots=True)
class FetchLimits:
    """Bounds of every download; the defaults are the settings' (docs/images.md)."""

    max_bytes: int = 64 * 2**30
    connect_timeout: float = 10.0
    # Per socket read, and for the answer's headers (connect included) of each request.
    read_timeout: float = 60.0
    # The whole download of one image, every request and redirect included.
    deadline: float = 6 * 3600.0
    # Slow-drip protection: each `rate_window` must bring `min_bytes_per_second * rate_window`.
    min_bytes_per_second: int = 10 * 1024
    rate_window: float = 60.0
    max_concurrent: int = 4


def open_session(
    policy: EgressPolicy, limits: FetchLimits, *, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """A session for image downloads. Call from a coroutine; close it when done.

    No DNS cache: each connection resolves once, through the policy, and connects to what that
    resolution returned. No proxy from the environment (`trust_env` stays False).
    """
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, resolver),
        use_dns_cache=False,
        socket_factory=GuardedSocketFactory(policy),
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=None, connect=limits.connect_timeout, sock_read=limits.read_timeout
        ),
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
    )


@asynccontextmanager
async def guarded_get(
    session: aiohttp.ClientSession,
    policy: EgressPolicy,
    url: str,
    *,
    limits: FetchLimits,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET `url`, following redirects by hand: every hop is checked like the first.

    :raise DownloadRefused: a refused address, a redirect to a URL that cannot be downloaded
        from, more than MAX_REDIRECTS redirects.
    :raise DownloadFailed: connection failure, no answer in time.
    """
    current = URL(url)
    for hop in range(MAX_REDIRECTS + 1):
        response = await _send(session, policy, url, current, hop=hop, limits=limits, headers=headers)
        if response.status not in REDIRECT_STATUSES:
            try:
                yield response
            finally:
                response.release()
            return
        location = response.headers.get("Location")
        response.release()
        current = _next_hop(url, current, location)
    raise DownloadRefused(f"{url}: refused: more than {MAX_REDIRECTS} redirects")


async def _send(
    session: aiohttp.ClientSession,
    policy: EgressPolicy,
    url: str,
    current: URL,
    *,
    hop: int,
    limits: FetchLimits,
    headers: dict[str, str] | None,
) -> aiohttp.ClientResponse:
    try:
        policy.refuse_literal(current.raw_host or "")
        async with asyncio.timeout(limits.read_timeout):
            return await session.get(current, headers=headers, allow_redirects=False)
    except AddressRefused as err:
        raise DownloadRefused(_refused(url, err, redirected=hop > 0), detail=str(err)) from err
    except (aiohttp.ClientError, TimeoutError) as err:
        # Refused, unreachable and timed out read alike: telling them apart would map ports.
        raise DownloadFailed(
            f"{url}: no answer (the connection failed or timed out)", detail=repr(err)
        ) from err


def _next_hop(url: str, current: URL, location: str | None) -> URL:
    if not location:
        raise DownloadFailed(f"{url}: a redirect without a target")
    try:
        target = current.join(URL(location)).with_fragment(None)
    except ValueError as err:
        raise DownloadRefused(f"{url}: refused: it redirects to a malformed URL") from err
    if url_problem(str(target)) is not None:
        # Not even the log gets the target: it may carry a signed token.
        raise DownloadRefused(f"{url}: refused: it redirects to a URL that cannot be downloaded from")
    return target


def _refused(url: str, err: AddressRefused, *, redirected: bool) -> str:
    if redirected:
        # The target came from the server: say nothing of it.
        return f"{url}: refused: it redirects to an address image downloads may not reach"
    return (
        f"{url}: refused: {err}, which image downloads may not reach"
        f" (an operator can allow networks with {ALLOW_SETTING})"
    )


def check_status(response: aiohttp.ClientResponse, url: str) -> None:
    """:raise DownloadFailed: anything but 200 or 206, by its class only."""
    if response.status not in (200, 206):
        raise DownloadFailed(
            f"{url}: HTTP error {response.status // 100}xx",
            detail=f"HTTP {response.status} {response.reason}",
        )


class TooSlow(DownloadFailed):
    """Fewer bytes than the minimum rate in one window."""


async def paced_chunks(
    response: aiohttp.ClientResponse, url: str, limits: FetchLimits
) -> AsyncIterator[bytes]:
    """The body as it arrives. :raise TooSlow: a window brought less than the minimum rate."""
    loop = asyncio.get_running_loop()
    floor = limits.min_bytes_per_second * limits.rate_window
    window_end, window_bytes = loop.time() + limits.rate_window, 0
    while True:
        try:
            async with asyncio.timeout_at(window_end if floor else None) as scope:
                chunk = await response.content.readany()
        except TimeoutError:
            if not scope.expired():
                raise
            chunk = None
        if chunk == b"":
            return
        if chunk:
            window_bytes += len(chunk)
            yield chunk
        if floor and loop.time() >= window_end:
            if window_bytes < floor:
                raise TooSlow(
                    f"{url}: slower than {limits.min_bytes_per_second // 1024} KiB/s over"
                    f" {limits.rate_window:g} s (image_download_min_kib_per_second);"
                    " what arrived is kept to resume from",
                    detail=f"{window_bytes} bytes in {limits.rate_window:g} s",
                )
            window_end, window_bytes = loop.time() + limits.rate_window, 0


def body_problem(url: str, err: BaseException) -> str:
    """A failure while the body arrived, in words that carry nothing the server sent."""
    if isinstance(err, TimeoutError):
        return f"{url}: the server stopped sending; what arrived is kept to resume from"
    return f"{url}: the connection ended early; what arrived is kept to resume from"
