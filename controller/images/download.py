"""One HTTP download, streamed into a partial file, hashed as it comes, verified, then installed.

Invariants:
- Nothing partial or unverified is ever in the cache dir: bytes go to `.downloads/<hex>.partial`
  and reach `sha256/<hex>` only by an atomic rename after the digest matched and the file was
  fsynced.
- A partial file is a resume point, not a promise: its bytes are hashed again before a resume,
  and whatever the server sends, the digest decides. So a server that changed the file between
  two attempts costs a download, never a wrong image.
- Bytes are stored as they come (`Accept-Encoding: identity`, no decompression): digests
  published next to images are digests of the file, as curl and wget would save it.

Time is bounded three ways (fetch.FetchLimits): each connect and each read, the whole
download (`deadline`), and the rate (`min_bytes_per_second` over each `rate_window`), so a
server dripping bytes cannot hold a download, or a download slot, for long. A download that
misses one keeps its partial file: the next attempt resumes it.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

import aiohttp
import structlog

from controller.images.egress import EgressPolicy
from controller.images.fetch import (
    DownloadError,
    DownloadFailed,
    DownloadRefused,
    FetchLimits,
    body_problem,
    check_status,
    guarded_get,
    paced_chunks,
)

log = structlog.get_logger(__name__)

SIDECAR_MAX_BYTES = 64 * 1024
# Bytes are written and hashed off the event loop in batches of this size: a write can block
# for seconds under writeback throttling, and a thread hop per MiB costs nothing measurable.
WRITE_BATCH_BYTES = 1024 * 1024
PROGRESS_LOG_SECONDS = 5.0
FILE_MODE = 0o644
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ChecksumMismatch(DownloadError):
    """The bytes downloaded completely but are not the image asked for. Nothing is kept."""

    reason: ClassVar[str] = "ImageChecksumMismatch"


@dataclass(slots=True)
class Progress:
    """How far a download is; read by the cache's lookups while the download writes it."""

    received: int = 0
    total: int | None = None

    @property
    def percent(self) -> int | None:
        if not self.total:
            return None
        return min(100, self.received * 100 // self.total)


@dataclass(frozen=True, slots=True)
class Job:
    url: str
    digest: str
    partial: Path
    target: Path
    limits: FetchLimits
    # Bytes this download may still write to the partial's filesystem (free space, less what
    # the other running downloads still need).
    room: Callable[[], int]
    # The digest came from `<url>.sha256`, not from the spec: a mismatch blames the sidecar.
    from_sidecar: bool = False


@dataclass(frozen=True, slots=True)
class Http:
    """What every request of the cache goes through."""

    session: aiohttp.ClientSession
    policy: EgressPolicy
    limits: FetchLimits


async def read_sidecar(http: Http, url: str, *, limit: int = SIDECAR_MAX_BYTES) -> str:
    """The text of a `.sha256` sidecar, at most `limit` bytes, within the download deadline.

    :raise DownloadFailed: HTTP error, timeout, too slow or connection failure.
    :raise DownloadRefused: a refused address, or the sidecar is larger than `limit`.
    """
    body = bytearray()
    try:
        async with (
            asyncio.timeout(http.limits.deadline),
            guarded_get(http.session, http.policy, url, limits=http.limits) as response,
        ):
            check_status(response, url)
            async for chunk in paced_chunks(response, url, http.limits):
                body += chunk
                if len(body) > limit:
                    raise DownloadRefused(f"{url} is larger than {limit // 1024} KiB: not a sha256 sidecar")
    except (aiohttp.ClientError, TimeoutError) as err:
        raise DownloadFailed(body_problem(url, err), detail=repr(err)) from err
    return body.decode("utf-8", errors="replace")


class _Partial:
    """The partial file open for appending, with the hash of every byte in it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed by close()
        self.hasher = hashlib.sha256()
        self.size = 0

    def rehash(self) -> None:
        """Hash the bytes a previous attempt left (blocking: run in a thread)."""
        with open(self.path, "rb") as existing:
            while chunk := existing.read(WRITE_BATCH_BYTES):
                self.hasher.update(chunk)
                self.size += len(chunk)

    def restart(self) -> None:
        self.file.truncate(0)
        self.hasher = hashlib.sha256()
        self.size = 0

    def append(self, data: bytes) -> None:
        """Blocking: run in a thread. hashlib releases the GIL for buffers this large."""
        self.file.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class Downloader:
    """Runs `Job`s through one `Http`. `monotonic` paces the progress log."""

    def __init__(self, http: Http, *, monotonic: Callable[[], float]) -> None:
        self._http = http
        self._monotonic = monotonic

    async def download(self, job: Job, progress: Progress) -> None:
        """Download `job.url` into `job.target`, resuming a partial file when there is one.

        :raise DownloadFailed: HTTP error, network failure, timeout, too slow, past the
            deadline, too little free space, local disk full; the partial file is kept.
        :raise DownloadRefused: a refused address, larger than the limit; nothing is kept.
        :raise ChecksumMismatch: the complete file has another digest; nothing is kept.
        """
        partial = _Partial(job.partial)
        try:
            await _in_thread(partial.rehash)
            if partial.size > job.limits.max_bytes:
                partial.restart()
            started, start_size = self._monotonic(), partial.size
            if partial.size == 0 or partial.hasher.hexdigest() != job.digest:
                await self._transfer_in_time(job, partial, progress)
            await self._verify_and_install(job, partial)
        except DownloadRefused:
            partial.discard()
            raise
        except OSError as err:
            raise DownloadFailed(_disk_problem(job, err), detail=repr(err)) from err
        finally:
            partial.close()
            if partial.size == 0:  # nothing to resume from (a 404, a refused connection)
                partial.path.unlink(missing_ok=True)
        log.info(
            "image_downloaded",
            url=job.url,
            digest=job.digest,
            bytes=partial.size,
            received=partial.size - start_size,
            seconds=round(self._monotonic() - started, 3),
        )

    async def _transfer_in_time(self, job: Job, partial: _Partial, progress: Progress) -> None:
        deadline = job.limits.deadline
        try:
            async with asyncio.timeout(deadline):
                await self._transfer(job, partial, progress)
        except TimeoutError as err:  # only the deadline's: _transfer maps the others
            raise DownloadFailed(
                f"{job.url}: not downloaded within {deadline:g} s (image_download_deadline_seconds);"
                " what arrived is kept to resume from"
            ) from err

    async def _transfer(self, job: Job, partial: _Partial, progress: Progress) -> None:
        try:
            if not await self._request(job, partial, progress, resume=partial.size > 0):
                # The server cannot serve the rest of this partial file: start over.
                partial.restart()
                await self._request(job, partial, progress, resume=False)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise DownloadFailed(body_problem(job.url, err), detail=repr(err)) from err

    async def _request(self, job: Job, partial: _Partial, progress: Progress, *, resume: bool) -> bool:
        """One GET (and its redirects); False when a resume was asked for and the reply cannot
        continue it."""
        headers = {"Range": f"bytes={partial.size}-"} if resume else {}
        http = self._http
        async with guarded_get(
            http.session, http.policy, job.url, limits=job.limits, headers=headers
        ) as response:
            if resume and response.status == 416:
                return False
            check_status(response, job.url)
            total = _expected_total(response, partial.size if resume else 0)
            if total is None:
                return False
            if response.status == 200 and partial.size:
                partial.restart()  # the server ignored Range and sends the whole file
            size = total if total >= 0 else None
            if size is not None:
                _check_size(job, size - partial.size, size)
            progress.total, progress.received = size, partial.size
            await self._receive(job, partial, response, progress)
            if size is not None and partial.size != size:
                raise DownloadFailed(
                    f"{job.url}: the body ended before its announced length; what arrived is kept"
                )
        return True

    async def _receive(
        self, job: Job, partial: _Partial, response: aiohttp.ClientResponse, progress: Progress
    ) -> None:
        batch = bytearray()
        started = last_log = self._monotonic()
        start_size = partial.size
        try:
            async for chunk in paced_chunks(response, job.url, job.limits):
                if partial.size + len(batch) + len(chunk) > job.limits.max_bytes:
                    raise DownloadRefused(_too_large(job))
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await _in_thread(partial.append, bytes(batch))
                    batch.clear()
                    progress.received = partial.size
                now = self._monotonic()
                if now - last_log >= PROGRESS_LOG_SECONDS:
                    last_log = now
                    _log_progress(job, progress, rate=(partial.size - start_size) / (now - started))
        except DownloadRefused:
            raise
        except (aiohttp.ClientError, TimeoutError, DownloadFailed, asyncio.CancelledError):
            # What arrived before the failure (or the deadline, or a stop) is good data: keep
            # it for the resume.
            if batch:
                await _in_thread(partial.append, bytes(batch))
                progress.received = partial.size
            raise
        if batch:
            await _in_thread(partial.append, bytes(batch))
        progress.received = partial.size

    async def _verify_and_install(self, job: Job, partial: _Partial) -> None:
        if partial.hasher.hexdigest() != job.digest:
            partial.discard()
            # Neither digest is shown when the sidecar gave it: both would be read-back of
            # what a server sent.
            expected = "the sha256 its sidecar gives" if job.from_sidecar else f"sha256 {job.digest}"
            raise ChecksumMismatch(
                f"{job.url}: the downloaded file does not match {expected}; nothing was cached",
                detail=f"actual sha256 {partial.hasher.hexdigest()}",
            )
        await _in_thread(_install, partial, job)


async def _in_thread(function: Callable[..., None], *args: object) -> None:
    """Run `function` in a thread; if cancelled meanwhile, let it finish before re-raising, so
    no thread touches the partial file once its download has returned."""
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _install(partial: _Partial, job: Job) -> None:
    """fsync, then rename into the cache and fsync the dir: after a crash the cache holds the
    whole verified file or none of it."""
    partial.sync()
    partial.close()
    os.chmod(partial.path, FILE_MODE)
    job.target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.replace(partial.path, job.target)
    directory = os.open(job.target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _expected_total(response: aiohttp.ClientResponse, offset: int) -> int | None:
    """The whole file's size (-1 when unknown), or None when a 206 does not start at `offset`."""
    if response.status == 200:
        return response.content_length if response.content_length is not None else -1
    match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None or int(match[1]) != offset:
        return None
    return int(match[3]) if match[3] != "*" else -1


def _log_progress(job: Job, progress: Progress, *, rate: float) -> None:
    log.info(
        "image_download_progress",
        url=job.url,
        digest=job.digest,
        bytes=progress.received,
        total=progress.total,
        percent=progress.percent,
        rate=int(rate),
    )


def _check_size(job: Job, remaining: int, size: int) -> None:
    """Before any byte of the body: refuse what is too large, wait for room for what is not."""
    if size > job.limits.max_bytes:
        raise DownloadRefused(_too_large(job))
    room = job.room()
    if remaining > room:
        raise DownloadFailed(
            f"{job.url}: the images dir has too little free space for this image ({_mib(room)} MiB"
            " usable); free some, the download is retried",
            detail=f"{remaining} bytes to go",
        )


def _mib(count: int) -> int:
    return max(0, count) // 2**20


def _too_large(job: Job) -> str:
    return f"{job.url}: refused: an image may have at most {job.limits.max_bytes} bytes (image_max_gib)"


def _disk_problem(job: Job, err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{job.url}: no space left in the images dir: free some, the download resumes"
    return f"{job.url}: writing into the images dir failed: {err.strerror or type(err).__name__}"
