"""The content-addressed cache of base images: `images/sha256/<hex>`, filled from URLs.

Invariants:
- A file in `sha256/` has the digest it is named by: only a verified download is renamed in
  (download.py), and nothing else writes there. Partial files live in `.downloads/`.
- At most one fetch runs per (URL, digest), however many VMs ask: later callers join it as
  waiters, and every waiter is woken when it ends. Fetches are keyed by the URL too, so one
  spec's URL never serves, holds back or shows up in another spec's VM that names the same
  digest from another URL; whichever installs the digest first ends the others.
- At most `limits.max_concurrent` fetches transfer at once; the others wait for a slot.
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
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from aiohttp.abc import AbstractResolver

from api.images import CACHE_DIR_NAME, CachedImage, RemoteImage, digest_problem, parse_sidecar
from api.store.image_sources import ImageSources
from api.store.sql import FAILURES
from controller.clock import Clock
from controller.images.download import Downloader, Http, Job, Progress, read_sidecar
from controller.images.egress import EgressPolicy
from controller.images.fetch import DownloadError, DownloadRefused, FetchLimits, open_session
from controller.images.files import entries, move, mtime, unlink_all
from controller.model import ImageLookup, ImageState

log = structlog.get_logger(__name__)

DOWNLOADS_DIR_NAME = ".downloads"
PARTIAL_SUFFIX = ".partial"
# Files on their way out: renamed here at once (so no lookup finds them), unlinked in a thread.
DELETING_SUFFIX = ".deleting"
TOUCH_SECONDS = 60.0
NOT_FOUND = "ImageNotFound"
DOWNLOADING = "ImageDownloading"
# A fetch's key: its URL, and the digest it downloads (None while its sidecar is read).
FlightKey = tuple[str, str | None]


@dataclass(eq=False, slots=True)
class _Flight:
    """One fetch: a sidecar read (when the digest is not given), then one download."""

    source: RemoteImage
    digest: str | None
    waiters: set[str]
    sources: set[RemoteImage]
    progress: Progress = field(default_factory=Progress)
    task: asyncio.Task[None] | None = None
    transferring: bool = False
    # Another URL installed this digest: the cancellation that follows is an end, not a stop.
    superseded: bool = False


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
        limits: FetchLimits | None = None,
        egress: EgressPolicy | None = None,
        resolver: AbstractResolver | None = None,
        retry_base: timedelta = timedelta(seconds=10),
        retry_cap: timedelta = timedelta(minutes=10),
    ) -> None:
        """`tasks` owns every fetch; `wake(uid)` is called for each waiter when its fetch ends.

        `limits` bound sizes, time and concurrency; `egress` says which addresses may be
        connected to; `resolver` (tests) replaces the system's DNS, under the same checks.
        """
        self._images_dir = images_dir
        self._cache_dir = images_dir / CACHE_DIR_NAME
        self._downloads_dir = images_dir / DOWNLOADS_DIR_NAME
        self._sources = sources
        self._tasks = tasks
        self._wake = wake
        self._clock = clock
        self._limits = limits or FetchLimits()
        self._egress = egress or EgressPolicy()
        self._resolver = resolver
        self._slots = asyncio.Semaphore(self._limits.max_concurrent)
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        # url -> digest, as the URL's sidecar last said.
        self._remembered: dict[str, str] = {}
        # By (url, digest), and by (url, None) while the digest is not known yet; one flight
        # may be under both keys.
        self._flights: dict[FlightKey, _Flight] = {}
        self._failures: dict[RemoteImage, _Failure] = {}
        self._http: Http | None = None
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
        if isinstance(source, CachedImage):
            # Not the download of some other spec's URL: that is none of this VM's business.
            return ImageLookup(
                ImageState.MISSING,
                reason=NOT_FOUND,
                message=f"sha256:{source.digest} is not in the image cache ({source.path} in the"
                " images dir); download it once through a URL disk with this sha256",
            )
        flight = self._flight_for(source, digest)
        if flight is not None:
            return ImageLookup(ImageState.FETCHING, reason=DOWNLOADING, message=self._describe(flight))
        failure = self._failures.get(source)
        if failure is not None and self._clock.now() < failure.retry_at:
            return ImageLookup(
                ImageState.FAILED, reason=failure.reason, message=failure.message, retry_at=failure.retry_at
            )
        return ImageLookup(
            ImageState.MISSING, reason=NOT_FOUND, message=f"{source.url} is not downloaded yet"
        )

    def fetch(self, source: RemoteImage, *, waiter: str) -> None:
        """Start fetching `source`, or join the fetch of its URL (and digest) that runs.
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
        """Delete cached images not in `referenced` and unused for `grace`; partial downloads
        of digests no longer referenced (their VMs are gone) or already cached, or not resumed
        for `grace`; and what sidecars said of digests neither cached nor referenced. Returns
        the digests deleted. Never deletes a digest, or a partial file, being downloaded.

        :raise OSError: the cache dir cannot be read.
        """
        cutoff = (self._clock.now() - grace).timestamp()
        # Decided and moved out of the cache without an await in between, so no lookup or
        # fetch can slip in between the check and the move.
        collected, doomed = self._doom_images(referenced, cutoff)
        doomed += self._doom_downloads(referenced, cutoff)
        await asyncio.to_thread(unlink_all, doomed)
        await self._forget_uncached(referenced)
        return collected

    async def close(self) -> None:
        """Cancel running fetches (partial files stay for a resume) and close the HTTP session."""
        self._closed = True
        running = {id(f): f.task for f in self._flights.values() if f.task is not None and not f.task.done()}
        for task in running.values():
            task.cancel()
        if running:
            await asyncio.wait(running.values())
        if self._http is not None:
            await self._http.session.close()
            self._http = None

    # ---- fetching ----------------------------------------------------------------------------

    def _start(self, flight: _Flight) -> None:
        key = (flight.source.url, flight.digest)
        coroutine = self._run(flight)
        try:
            flight.task = self._tasks.create_task(coroutine, name=f"image-fetch-{(flight.digest or '')[:12]}")
        except RuntimeError as err:  # the TaskGroup is shutting down: nothing may start
            coroutine.close()
            log.warning("image_fetch_not_started", url=flight.source.url, error=str(err))
            return
        self._flights[key] = flight

    async def _run(self, flight: _Flight) -> None:
        """The whole fetch. Catches everything but cancellation: a failed download must never
        tear down the TaskGroup, which is the controller's."""
        try:
            async with self._slots:
                flight.transferring = True
                await self._fetch(flight)
        except asyncio.CancelledError:
            if not flight.superseded:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
        except DownloadError as err:
            self._fail(flight, err.reason, str(err), detail=err.detail)
        except Exception as err:  # a bug here must not stop the controller
            log.exception("image_fetch_crashed", url=flight.source.url, digest=flight.digest)
            self._fail(
                flight, "ImageDownloadFailed", f"{flight.source.url}: unexpected error", detail=repr(err)
            )
        else:
            for source in flight.sources:
                self._failures.pop(source, None)
        finally:
            self._land(flight)
        for waiter in sorted(flight.waiters):
            self._wake(waiter)

    async def _fetch(self, flight: _Flight) -> None:
        digest = flight.digest or await self._resolve_for(flight)
        if digest is None or self._is_cached(digest, touch=False):
            return
        job = Job(
            url=flight.source.url,
            digest=digest,
            partial=self._downloads_dir / partial_name(flight.source.url, digest),
            target=self.path_of(digest),
            limits=self._limits,
            room=lambda: self._room(flight),
            from_sidecar=flight.source.digest is None,
        )
        await Downloader(self._open_http(), monotonic=self._clock.monotonic).download(job, flight.progress)
        # Installed: now is its first use (the flight still guards it from collection).
        self._is_cached(digest, touch=True)
        self._supersede(flight, digest)

    def _supersede(self, winner: _Flight, digest: str) -> None:
        """End the other URLs' downloads of `digest`: their waiters find it cached."""
        for flight in list(self._flights.values()):
            if flight is not winner and flight.digest == digest and flight.task is not None:
                flight.superseded = True
                flight.task.cancel()

    def _room(self, flight: _Flight) -> int:
        """Free bytes in the downloads dir less what the other transfers still need."""
        stat = os.statvfs(self._downloads_dir)
        promised = sum(
            max(0, (other.progress.total or 0) - other.progress.received)
            for other in set(self._flights.values())
            if other is not flight and other.transferring
        )
        return stat.f_bavail * stat.f_frsize - promised

    async def _resolve_for(self, flight: _Flight) -> str | None:
        """Read the sidecar; the digest to download, or None when those bytes are cached or
        being downloaded from this URL already (then this flight's waiters wait on that)."""
        url = flight.source.url
        digest = await self._resolve(flight.source)
        joined = self._flights.get((url, digest))
        if joined is not None:
            # Its waiters are ours now, and later callers find it by the digest.
            joined.waiters |= flight.waiters
            joined.sources |= flight.sources
            flight.waiters = set()
            self._land(flight)
        else:
            flight.digest = digest
            self._flights[(url, digest)] = flight
        await self._sources_remember(url, digest)
        if joined is not None or self._is_cached(digest, touch=False):
            return None
        return digest

    async def _resolve(self, source: RemoteImage) -> str:
        """The digest `source`'s sidecar gives. :raise DownloadError: unreadable or unusable."""
        text = await read_sidecar(self._open_http(), source.sidecar_url)
        digest = parse_sidecar(text, source.url)
        if digest is None:
            name = source.url.rstrip("/").rsplit("/", 1)[-1]
            raise DownloadRefused(f"{source.sidecar_url} gives no sha256 digest for {name!r}")
        self._remembered[source.url] = digest
        return digest

    async def _sources_remember(self, url: str, digest: str) -> None:
        try:
            await self._sources.remember(url, digest)
        except FAILURES as err:
            # Known in memory for this run; after a restart the sidecar is read again.
            log.warning("image_source_not_stored", url=url, digest=digest, error=str(err))

    def _fail(self, flight: _Flight, reason: str, message: str, *, detail: str | None) -> None:
        """Record the failure for the sources of this flight (all of its URL)."""
        now = self._clock.now()
        retry_in = self._retry_base
        for source in flight.sources:
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
            detail=detail,
            retry_in=retry_in.total_seconds(),
        )

    def _land(self, flight: _Flight) -> None:
        for key in ((flight.source.url, None), (flight.source.url, flight.digest)):
            if self._flights.get(key) is flight:
                del self._flights[key]

    def _flight_for(self, source: RemoteImage, digest: str | None) -> _Flight | None:
        flight = self._flights.get((source.url, digest))
        if flight is None and source.digest is None:
            flight = self._flights.get((source.url, None))
        return flight

    def _digests_in_flight(self) -> set[str]:
        return {flight.digest for flight in self._flights.values() if flight.digest is not None}

    def _open_http(self) -> Http:
        if self._http is None:
            session = open_session(self._egress, self._limits, resolver=self._resolver)
            self._http = Http(session, self._egress, self._limits)
        return self._http

    def _describe(self, flight: _Flight) -> str:
        url = flight.source.url
        if not flight.transferring:
            return f"{url}: waiting for one of the {self._limits.max_concurrent} download slots"
        if flight.digest is None:
            return f"reading {flight.source.sidecar_url}"
        progress = flight.progress
        if progress.percent is not None and progress.total is not None:
            return f"downloading {url}: {progress.percent}% of {_size(progress.total)}"
        return f"downloading {url}: {_size(progress.received)} so far"

    def _is_cached(self, digest: str, *, touch: bool) -> bool:
        """Whether the cache holds `digest`; with `touch`, mark it used (at most once a minute,
        so lookups on every reconcile cost a stat, not a write)."""
        path = self.path_of(digest)
        try:
            used_at = path.stat().st_mtime
        except OSError:
            return False
        now = self._clock.now().timestamp()
        if touch and abs(now - used_at) >= TOUCH_SECONDS:
            with contextlib.suppress(OSError):
                os.utime(path, (now, now))
        return True

    # ---- garbage collection ------------------------------------------------------------------

    def _doom_images(self, referenced: set[str], cutoff: float) -> tuple[list[str], list[Path]]:
        collected: list[str] = []
        doomed: list[Path] = []
        for entry in entries(self._cache_dir):
            name = entry.name
            if digest_problem(name) is not None or not entry.is_file(follow_symlinks=False):
                self._log_foreign(entry.path)
                continue
            if name in referenced or name in self._digests_in_flight() or mtime(entry) > cutoff:
                continue
            trash = self._downloads_dir / (name + DELETING_SUFFIX)
            if move(Path(entry.path), trash):
                collected.append(name)
                doomed.append(trash)
        return collected, doomed

    def _doom_downloads(self, referenced: set[str], cutoff: float) -> list[Path]:
        """Leftovers of interrupted deletions, and partial files no running download writes
        that are useless (digest unreferenced or cached) or were not resumed for `grace`
        (renamed at once too, so a download starting meanwhile begins a file of its own)."""
        writing = {
            partial_name(flight.source.url, flight.digest)
            for flight in self._flights.values()
            if flight.digest is not None
        }
        doomed: list[Path] = []
        for entry in entries(self._downloads_dir):
            path = Path(entry.path)
            if entry.name.endswith(DELETING_SUFFIX):
                doomed.append(path)
            elif entry.name.endswith(PARTIAL_SUFFIX) and entry.name not in writing:
                digest = entry.name[:64]
                useless = digest not in referenced or self._is_cached(digest, touch=False)
                trash = path.with_name(entry.name + DELETING_SUFFIX)
                if (useless or mtime(entry) <= cutoff) and move(path, trash):
                    doomed.append(trash)
        return doomed

    async def _forget_uncached(self, referenced: set[str]) -> None:
        """Forget what sidecars said of digests neither cached, referenced nor downloading:
        such a row would only spare a sidecar read, and a missing image reads its sidecar again
        anyway. A referenced one stays: it keeps that spec's partial file from collection."""
        in_flight = self._digests_in_flight()
        stale = {
            digest
            for digest in set(self._remembered.values())
            if digest not in in_flight
            and digest not in referenced
            and not self._is_cached(digest, touch=False)
        }
        if not stale:
            return
        try:
            await self._sources.forget_digests(sorted(stale))
        except FAILURES as err:
            log.warning("image_sources_not_forgotten", error=str(err))
            return
        self._remembered = {url: d for url, d in self._remembered.items() if d not in stale}

    def _log_foreign(self, path: str) -> None:
        if path not in self._foreign_logged:
            self._foreign_logged.add(path)
            log.warning(
                "image_cache_foreign_file", path=path, hint="not named by a sha256 digest; left alone"
            )


def partial_name(url: str, digest: str) -> str:
    """The partial file of one (URL, digest): two URLs of one digest never write one file."""
    return f"{digest}-{hashlib.sha256(url.encode()).hexdigest()[:16]}{PARTIAL_SUFFIX}"


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
