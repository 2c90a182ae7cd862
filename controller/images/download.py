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

Every request has a connect and a per-read deadline but no total one: a large image on a slow
link may take hours, and a stalled one stops within `read_timeout`.
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

log = structlog.get_logger(__name__)

SIDECAR_MAX_BYTES = 64 * 1024
# Bytes are written and hashed off the event loop in batches of this size: a write can block
# for seconds under writeback throttling, and a thread hop per MiB costs nothing measurable.
WRITE_BATCH_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 256 * 1024
PROGRESS_LOG_SECONDS = 5.0
FILE_MODE = 0o644
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(Exception):
    """A fetch that did not produce a verified file. `reason` is the condition reason to show.

    Every kind is retried by the cache with backoff; none is worth retrying at once.
    """

    reason: ClassVar[str] = "ImageDownloadFailed"


class DownloadFailed(DownloadError):
    """The server, the network or the local disk failed (HTTP error, timeout, reset, disk full).
    A partial file is kept for a resume."""


class DownloadRefused(DownloadFailed):
    """The image is larger than allowed, or the sidecar is unusable: retrying helps only once
    the source or the setting changes. Nothing is kept."""


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
    max_bytes: int


def open_session(*, connect_timeout: float, read_timeout: float) -> aiohttp.ClientSession:
    """A session for image downloads. Call from a coroutine; close it when done."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout),
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
    )


async def read_sidecar(session: aiohttp.ClientSession, url: str, *, limit: int = SIDECAR_MAX_BYTES) -> str:
    """The text of a `.sha256` sidecar, at most `limit` bytes.

    :raise DownloadFailed: HTTP error, timeout or connection failure.
    :raise DownloadRefused: the sidecar is larger than `limit`.
    """
    body = bytearray()
    try:
        async with session.get(url) as response:
            _check_status(response, url)
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise DownloadRefused(f"{url} is larger than {limit // 1024} KiB: not a sha256 sidecar")
    except (aiohttp.ClientError, TimeoutError) as err:
        raise DownloadFailed(_network_problem(url, err)) from err
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
    """Runs `Job`s on one session. `monotonic` paces the progress log."""

    def __init__(self, session: aiohttp.ClientSession, *, monotonic: Callable[[], float]) -> None:
        self._session = session
        self._monotonic = monotonic

    async def download(self, job: Job, progress: Progress) -> None:
        """Download `job.url` into `job.target`, resuming a partial file when there is one.

        :raise DownloadFailed: HTTP error, network failure or timeout, local disk full; the
            partial file is kept for a resume.
        :raise DownloadRefused: larger than `job.max_bytes`; nothing is kept.
        :raise ChecksumMismatch: the complete file has another digest; nothing is kept.
        """
        partial = _Partial(job.partial)
        try:
            await _in_thread(partial.rehash)
            if partial.size > job.max_bytes:
                partial.restart()
            started, start_size = self._monotonic(), partial.size
            if partial.size == 0 or partial.hasher.hexdigest() != job.digest:
                await self._transfer(job, partial, progress)
            await self._verify_and_install(job, partial)
        except DownloadRefused:
            partial.discard()
            raise
        except OSError as err:
            raise DownloadFailed(_disk_problem(job, err)) from err
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

    async def _transfer(self, job: Job, partial: _Partial, progress: Progress) -> None:
        try:
            if not await self._request(job, partial, progress, resume=partial.size > 0):
                # The server cannot serve the rest of this partial file: start over.
                partial.restart()
                await self._request(job, partial, progress, resume=False)
        except aiohttp.ClientPayloadError as err:
            raise DownloadFailed(
                f"{job.url}: the connection ended early; {partial.size} bytes are kept to resume from"
            ) from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise DownloadFailed(_network_problem(job.url, err)) from err

    async def _request(self, job: Job, partial: _Partial, progress: Progress, *, resume: bool) -> bool:
        """One GET; False when a resume was asked for and the reply cannot continue it."""
        headers = {"Range": f"bytes={partial.size}-"} if resume else {}
        async with self._session.get(job.url, headers=headers) as response:
            if resume and response.status == 416:
                return False
            _check_status(response, job.url)
            total = _expected_total(response, partial.size if resume else 0)
            if total is None:
                return False
            if response.status == 200 and partial.size:
                partial.restart()  # the server ignored Range and sends the whole file
            size = total if total >= 0 else None
            if size is not None and size > job.max_bytes:
                raise DownloadRefused(_too_large(job, size))
            progress.total, progress.received = size, partial.size
            await self._receive(job, partial, response, progress)
            if size is not None and partial.size != size:
                raise DownloadFailed(f"{job.url}: the body ended after {partial.size} of {size} bytes")
        return True

    async def _receive(
        self, job: Job, partial: _Partial, response: aiohttp.ClientResponse, progress: Progress
    ) -> None:
        batch = bytearray()
        started = last_log = self._monotonic()
        start_size = partial.size
        try:
            async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
                if partial.size + len(batch) + len(chunk) > job.max_bytes:
                    raise DownloadRefused(_too_large(job, None))
                batch += chunk
                if len(batch) >= WRITE_BATCH_BYTES:
                    await _in_thread(partial.append, bytes(batch))
                    batch.clear()
                    progress.received = partial.size
                now = self._monotonic()
                if now - last_log >= PROGRESS_LOG_SECONDS:
                    last_log = now
                    _log_progress(job, progress, rate=(partial.size - start_size) / (now - started))
        except (aiohttp.ClientError, TimeoutError):
            # What arrived before the failure is good data: keep it for the resume.
            if batch:
                await _in_thread(partial.append, bytes(batch))
                progress.received = partial.size
            raise
        if batch:
            await _in_thread(partial.append, bytes(batch))
        progress.received = partial.size

    async def _verify_and_install(self, job: Job, partial: _Partial) -> None:
        actual = partial.hasher.hexdigest()
        if actual != job.digest:
            partial.discard()
            raise ChecksumMismatch(
                f"{job.url} has sha256 {actual}, expected {job.digest}; nothing was cached"
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


def _check_status(response: aiohttp.ClientResponse, url: str) -> None:
    """:raise DownloadFailed: anything but 200 or 206 (after redirects were followed)."""
    if response.status not in (200, 206):
        # The asked-for URL, not response.url: a redirect target may carry a signed token.
        status = f"{response.status} {response.reason}" if response.reason else str(response.status)
        raise DownloadFailed(f"HTTP {status} from {url}")


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


def _too_large(job: Job, size: int | None) -> str:
    what = f"is {size} bytes" if size is not None else "is larger than that"
    return f"{job.url}: an image may have at most {job.max_bytes} bytes (image_max_gib); this one {what}"


def _network_problem(url: str, err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return f"{url}: no answer in time ({type(err).__name__})"
    return f"{url}: {type(err).__name__}: {err}" if str(err) else f"{url}: {type(err).__name__}"


def _disk_problem(job: Job, err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {job.url} in {job.partial.parent}: free some, the download resumes"
    return f"writing {job.url} to {job.partial} failed: {err}"
