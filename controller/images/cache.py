"""The content-addressed cache of base images: `images/sha256/<hex>`, filled from URLs.

Invariants:
- A file in `sha256/` has the digest it is named by: only a verified download is renamed in
  (download.py), and nothing else writes there. Partial files live in `.downloads/`.
- At most one download runs per digest, and one sidecar read per URL, however many VMs ask:
  later callers join the running fetch as waiters, and every waiter is woken when it ends.
- `lookup` never touches the network: it answers from a stat() and what this process knows
  (fetches running, failures and their backoff, digests sidecars gave).
- A failed fetch is not retried before its `retry_at` (per source, exponential, reset by a
  success). The reconciler asks again after that; the cache never retries on its own.
- A cached file's mtime is its "last used" time on the injected clock (touched by lookups at
  most once a minute); garbage collection removes only files unreferenced and unused for the
  grace period, and never a digest being downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import structlog

from api.images import CACHE_DIR_NAME, CachedImage, RemoteImage, digest_problem, parse_sidecar
from api.store.errors import StoreError
from api.store.image_sources import ImageSources
from controller.clock import Clock
from controller.images.download import (
    Downloader,
    DownloadError,
    DownloadRefused,
    Job,
    Progress,
    open_session,
    read_sidecar,
)
from controller.model import ImageLookup, ImageState

log = structlog.get_logger(__name__)

DOWNLOADS_DIR_NAME = ".downloads"
PARTIAL_SUFFIX = ".partial"
# Files on their way out: renamed here at once (so no lookup finds them), unlinked in a thread.
DELETING_SUFFIX = ".deleting"
TOUCH_SECONDS = 60.0
NOT_FOUND = "ImageNotFound"
DOWNLOADING = "ImageDownloading"
_URL_KEY = "url:"


@dataclass(eq=False, slots=True)
class _Flight:
    """One fetch: a sidecar read (when the digest is not given), then one download."""

    source: RemoteImage
    digest: str | None
    waiters: set[str]
    sources: set[RemoteImage]
    progress: Progress = field(default_factory=Progress)
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class _Failure:
    count: int
    reason: str
    message: str
    retry_at: datetime


class ImageCache:
    def __init__(
        self,
        *,
        images_dir: Path,
        sources: ImageSources,
        tasks: asyncio.TaskGroup,
        wake: Callable[[str], None],
        clock: Clock,
        max_bytes: int = 64 * 2**30,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retry_base: timedelta = timedelta(seconds=10),
        retry_cap: timedelta = timedelta(minutes=10),
    ) -> None:
        """`tasks` owns every fetch; `wake(uid)` is called for each waiter when its fetch ends.

        `connect_timeout` and `read_timeout` bound each connection attempt and each socket
        read; there is no total deadline (a large image on a slow link takes long, a stalled
        one fails within `read_timeout`).
        """
        self._images_dir = images_dir
        self._cache_dir = images_dir / CACHE_DIR_NAME
        self._downloads_dir = images_dir / DOWNLOADS_DIR_NAME
        self._sources = sources
        self._tasks = tasks
        self._wake = wake
        self._clock = clock
        self._max_bytes = max_bytes
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        # url -> digest, as the URL's sidecar last said.
        self._remembered: dict[str, str] = {}
        # By digest, and by "url:<url>" while the digest is not known yet; one flight may be
        # under both keys.
        self._flights: dict[str, _Flight] = {}
        self._failures: dict[RemoteImage, _Failure] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._foreign_logged: set[str] = set()

    async def load(self) -> None:
        """Read what sidecars said before (once, at start)."""
        self._remembered = {row.url: row.digest for row in await self._sources.all()}

    def digest_of(self, source: CachedImage | RemoteImage) -> str | None:
        """The digest `source` names, or its sidecar gave; None while that is unknown."""
        if isinstance(source, CachedImage):
            return source.digest
        return source.digest or self._remembered.get(source.url)

    def path_of(self, digest: str) -> Path:
        return self._cache_dir / digest

    def lookup(self, source: CachedImage | RemoteImage) -> ImageLookup:
        """Where `source` stands: READY (with its path), FETCHING, FAILED until retry_at, or
        MISSING. Never touches the network."""
        digest = self.digest_of(source)
        if digest is not None and self._is_cached(digest, touch=True):
            return ImageLookup(ImageState.READY, path=self.path_of(digest))
        flight = self._flight_for(source, digest)
        if flight is not None:
            return ImageLookup(ImageState.FETCHING, reason=DOWNLOADING, message=_describe(flight))
        if isinstance(source, CachedImage):
            return ImageLookup(
                ImageState.MISSING,
                reason=NOT_FOUND,
                message=f"sha256:{source.digest} is not in the image cache ({source.path} in the"
                " images dir); download it once through a URL disk with this sha256",
            )
        failure = self._failures.get(source)
        if failure is not None and self._clock.now() < failure.retry_at:
            return ImageLookup(
                ImageState.FAILED, reason=failure.reason, message=failure.message, retry_at=failure.retry_at
            )
        return ImageLookup(
            ImageState.MISSING, reason=NOT_FOUND, message=f"{source.url} is not downloaded yet"
        )

    def fetch(self, source: RemoteImage, *, waiter: str) -> None:
        """Start fetching `source`, or join the fetch of it (or of its digest) that runs.
        `wake(waiter)` is called when that fetch ends. Does nothing while a failure of this
        source waits for its retry time. Never raises."""
        if self._closed:
            return
        digest = self.digest_of(source)
        if digest is not None and self._is_cached(digest, touch=False):
            self._wake(waiter)
            return
        flight = self._flight_for(source, digest)
        if flight is not None:
            flight.waiters.add(waiter)
            flight.sources.add(source)
            return
        failure = self._failures.get(source)
        if failure is not None and self._clock.now() < failure.retry_at:
            return
        self._start(_Flight(source, source.digest, {waiter}, {source}))

    async def collect_garbage(self, referenced: set[str], *, grace: timedelta) -> list[str]:
        """Delete cached images not in `referenced` and unused for `grace`, stale partial
        downloads, and what sidecars said of digests no longer cached. Returns the digests
        deleted. Never deletes a digest being downloaded.

        :raise OSError: the cache dir cannot be read.
        """
        cutoff = (self._clock.now() - grace).timestamp()
        # Decided and moved out of the cache without an await in between, so no lookup or
        # fetch can slip in between the check and the move.
        collected, doomed = self._doom_images(referenced, cutoff)
        doomed += self._doom_downloads(cutoff)
        await asyncio.to_thread(_unlink_all, doomed)
        await self._forget_uncached()
        return collected

    async def close(self) -> None:
        """Cancel running fetches (partial files stay for a resume) and close the HTTP session."""
        self._closed = True
        running = {id(f): f.task for f in self._flights.values() if f.task is not None and not f.task.done()}
        for task in running.values():
            task.cancel()
        if running:
            await asyncio.wait(running.values())
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- fetching ----------------------------------------------------------------------------

    def _start(self, flight: _Flight) -> None:
        key = flight.digest or _URL_KEY + flight.source.url
        coroutine = self._run(flight)
        try:
            flight.task = self._tasks.create_task(coroutine, name=f"image-fetch-{key[:24]}")
        except RuntimeError as err:  # the TaskGroup is shutting down: nothing may start
            coroutine.close()
            log.warning("image_fetch_not_started", url=flight.source.url, error=str(err))
            return
        self._flights[key] = flight

    async def _run(self, flight: _Flight) -> None:
        """The whole fetch. Catches everything but cancellation: a failed download must never
        tear down the TaskGroup, which is the controller's."""
        try:
            await self._fetch(flight)
        except DownloadError as err:
            self._fail(flight, err.reason, str(err))
        except Exception as err:  # a bug here must not stop the controller
            log.exception("image_fetch_crashed", url=flight.source.url, digest=flight.digest)
            self._fail(flight, "ImageDownloadFailed", f"unexpected error fetching {flight.source.url}: {err}")
        else:
            for source in flight.sources:
                self._failures.pop(source, None)
        finally:
            self._land(flight)
        for waiter in sorted(flight.waiters):
            self._wake(waiter)

    async def _fetch(self, flight: _Flight) -> None:
        digest = flight.digest or await self._resolve_for(flight)
        if digest is None:
            return
        job = Job(
            url=flight.source.url,
            digest=digest,
            partial=self._downloads_dir / (digest + PARTIAL_SUFFIX),
            target=self.path_of(digest),
            max_bytes=self._max_bytes,
        )
        await Downloader(self._open_session(), monotonic=self._clock.monotonic).download(job, flight.progress)
        # Installed: now is its first use (the flight still guards it from collection).
        self._is_cached(digest, touch=True)

    async def _resolve_for(self, flight: _Flight) -> str | None:
        """Read the sidecar; the digest to download, or None when those bytes are cached or
        being downloaded already (then this flight's waiters wait on that download)."""
        digest = await self._resolve(flight.source)
        joined = self._flights.get(digest)
        if joined is not None:
            # Its waiters are ours now, and later callers find it by the digest.
            joined.waiters |= flight.waiters
            joined.sources |= flight.sources
            flight.waiters = set()
            self._land(flight)
        else:
            flight.digest = digest
            self._flights[digest] = flight
        await self._sources_remember(flight.source.url, digest)
        if joined is not None or self._is_cached(digest, touch=False):
            return None
        return digest

    async def _resolve(self, source: RemoteImage) -> str:
        """The digest `source`'s sidecar gives. :raise DownloadError: unreadable or unusable."""
        text = await read_sidecar(self._open_session(), source.sidecar_url)
        digest = parse_sidecar(text, source.url)
        if digest is None:
            name = source.url.rstrip("/").rsplit("/", 1)[-1]
            raise DownloadRefused(f"{source.sidecar_url} gives no sha256 digest for {name!r}")
        self._remembered[source.url] = digest
        return digest

    async def _sources_remember(self, url: str, digest: str) -> None:
        try:
            await self._sources.remember(url, digest)
        except (StoreError, sqlite3.Error) as err:
            # Known in memory for this run; after a restart the sidecar is read again.
            log.warning("image_source_not_stored", url=url, digest=digest, error=str(err))

    def _fail(self, flight: _Flight, reason: str, message: str) -> None:
        """Record the failure for the sources that used this URL; joined sources of the same
        digest from other URLs stay free to try theirs."""
        now = self._clock.now()
        retry_in = self._retry_base
        for source in flight.sources:
            if source.url != flight.source.url:
                continue
            previous = self._failures.get(source)
            count = previous.count + 1 if previous else 1
            retry_in = min(self._retry_cap, self._retry_base * 2 ** min(count - 1, 32))
            self._failures[source] = _Failure(count, reason, message, now + retry_in)
        log.warning(
            "image_fetch_failed",
            url=flight.source.url,
            digest=flight.digest,
            reason=reason,
            message=message,
            retry_in=retry_in.total_seconds(),
        )

    def _land(self, flight: _Flight) -> None:
        for key in (_URL_KEY + flight.source.url, flight.digest):
            if key is not None and self._flights.get(key) is flight:
                del self._flights[key]

    def _flight_for(self, source: CachedImage | RemoteImage, digest: str | None) -> _Flight | None:
        if digest is not None and digest in self._flights:
            return self._flights[digest]
        if isinstance(source, RemoteImage) and source.digest is None:
            return self._flights.get(_URL_KEY + source.url)
        return None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = open_session(
                connect_timeout=self._connect_timeout, read_timeout=self._read_timeout
            )
        return self._session

    def _is_cached(self, digest: str, *, touch: bool) -> bool:
        """Whether the cache holds `digest`; with `touch`, mark it used (at most once a minute,
        so lookups on every reconcile cost a stat, not a write)."""
        path = self.path_of(digest)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return False
        now = self._clock.now().timestamp()
        if touch and abs(now - mtime) >= TOUCH_SECONDS:
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
        return True

    # ---- garbage collection ------------------------------------------------------------------

    def _doom_images(self, referenced: set[str], cutoff: float) -> tuple[list[str], list[Path]]:
        collected: list[str] = []
        doomed: list[Path] = []
        for entry in _entries(self._cache_dir):
            name = entry.name
            if digest_problem(name) is not None or not entry.is_file(follow_symlinks=False):
                self._log_foreign(entry.path)
                continue
            if name in referenced or name in self._flights or _mtime(entry) > cutoff:
                continue
            trash = self._downloads_dir / (name + DELETING_SUFFIX)
            if _move(Path(entry.path), trash):
                collected.append(name)
                doomed.append(trash)
        return collected, doomed

    def _doom_downloads(self, cutoff: float) -> list[Path]:
        """Leftovers of interrupted deletions, and partial files nobody resumed for `grace`
        (renamed at once too, so a download starting meanwhile begins a file of its own)."""
        doomed: list[Path] = []
        for entry in _entries(self._downloads_dir):
            path = Path(entry.path)
            if entry.name.endswith(DELETING_SUFFIX):
                doomed.append(path)
            elif entry.name.endswith(PARTIAL_SUFFIX):
                digest = entry.name.removesuffix(PARTIAL_SUFFIX)
                trash = path.with_name(entry.name + DELETING_SUFFIX)
                if digest not in self._flights and _mtime(entry) <= cutoff and _move(path, trash):
                    doomed.append(trash)
        return doomed

    async def _forget_uncached(self) -> None:
        """Forget what sidecars said of digests neither cached nor downloading: such a row
        would only spare a sidecar read, and a missing image reads its sidecar again anyway."""
        stale = {
            digest
            for digest in set(self._remembered.values())
            if digest not in self._flights and not self._is_cached(digest, touch=False)
        }
        if not stale:
            return
        try:
            await self._sources.forget_digests(sorted(stale))
        except (StoreError, sqlite3.Error) as err:
            log.warning("image_sources_not_forgotten", error=str(err))
            return
        self._remembered = {url: d for url, d in self._remembered.items() if d not in stale}

    def _log_foreign(self, path: str) -> None:
        if path not in self._foreign_logged:
            self._foreign_logged.add(path)
            log.warning(
                "image_cache_foreign_file", path=path, hint="not named by a sha256 digest; left alone"
            )


def _describe(flight: _Flight) -> str:
    if flight.digest is None:
        return f"reading {flight.source.sidecar_url}"
    progress = flight.progress
    if progress.percent is not None and progress.total is not None:
        return f"downloading {flight.source.url}: {progress.percent}% of {_size(progress.total)}"
    return f"downloading {flight.source.url}: {_size(progress.received)} so far"


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return float("inf")  # vanished or unreadable: not ours to delete now


def _move(source: Path, target: Path) -> bool:
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(source, target)
    except OSError as err:
        log.warning("image_cache_delete_failed", path=str(source), error=str(err))
        return False
    return True


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("image_cache_delete_failed", path=str(path), error=str(err))
