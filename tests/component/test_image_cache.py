"""ImageCache and its downloads against a real loopback HTTP server and a real store: single
flight, verification, resume, failures and their backoff, sidecars, and garbage collection."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from api.images import CachedImage, RemoteImage
from api.store import Database
from api.store.image_sources import ImageSources
from controller.clock import ManualClock
from controller.images import ImageCache
from controller.model import ImageLookup, ImageState

IMAGE = os.urandom(3 * 1024 * 1024 + 123)
DIGEST = hashlib.sha256(IMAGE).hexdigest()
OTHER_DIGEST = hashlib.sha256(b"something else").hexdigest()
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.01


@dataclass
class ImageServer:
    """Serves IMAGE at /disk.img (and a sidecar) and counts what it was asked."""

    body: bytes = IMAGE
    sidecar: str = f"{DIGEST}  disk.img\n"
    status: int = 200
    honour_range: bool = True
    chunked: bool = False
    # Send this many bytes of the next response, then drop the connection.
    cut_after: int | None = None
    # Send this many bytes, then stall until `release` is set.
    stall_after: int | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    image_gets: int = 0
    sidecar_gets: int = 0
    ranges: list[str | None] = field(default_factory=list)
    url: str = ""

    async def image(self, request: web.Request) -> web.StreamResponse:
        self.image_gets += 1
        self.ranges.append(request.headers.get("Range"))
        if self.status != 200:
            return web.Response(status=self.status)
        start = self._range_start(request)
        body = self.body[start:]
        response = web.StreamResponse(status=206 if start else 200)
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(self.body) - 1}/{len(self.body)}"
        if self.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        if self.cut_after is not None:
            await response.write(body[: self.cut_after])
            self.cut_after = None
            assert request.transport is not None
            request.transport.close()
            return response
        if self.stall_after is not None:
            await response.write(body[: self.stall_after])
            await self.release.wait()
            body = body[self.stall_after :]
        await response.write(body)
        await response.write_eof()
        return response

    async def sidecar_file(self, request: web.Request) -> web.Response:
        self.sidecar_gets += 1
        return web.Response(text=self.sidecar)

    def _range_start(self, request: web.Request) -> int:
        header = request.headers.get("Range")
        if not self.honour_range or header is None:
            return 0
        return int(header.removeprefix("bytes=").rstrip("-"))


@dataclass
class Woken:
    uids: list[str] = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, uid: str) -> None:
        self.uids.append(uid)
        self.event.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), WAIT_SECONDS)
        self.event.clear()


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    image_server = ImageServer()
    app = web.Application()
    app.router.add_get("/disk.img", image_server.image)
    app.router.add_get("/disk.img.sha256", image_server.sidecar_file)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    image_server.url = str(test_server.make_url("/disk.img"))
    yield image_server
    image_server.release.set()
    await test_server.close()


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


CacheFactory = Callable[..., Awaitable[ImageCache]]


@pytest.fixture
async def tasks() -> AsyncIterator[asyncio.TaskGroup]:
    async with asyncio.TaskGroup() as group:
        yield group


@pytest.fixture
async def woken() -> Woken:
    return Woken()


@pytest.fixture
async def make_cache(
    db: Database, images_dir: Path, tasks: asyncio.TaskGroup, woken: Woken, manual_clock: ManualClock
) -> AsyncIterator[CacheFactory]:
    made: list[ImageCache] = []

    async def make(*, max_bytes: int = 64 * 2**30) -> ImageCache:
        cache = ImageCache(
            images_dir=images_dir,
            sources=ImageSources(db),
            tasks=tasks,
            wake=woken,
            clock=manual_clock,
            max_bytes=max_bytes,
            connect_timeout=2.0,
            read_timeout=2.0,
        )
        await cache.load()
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.close()


@pytest.fixture
async def cache(make_cache: CacheFactory) -> ImageCache:
    return await make_cache()


def remote(server: ImageServer, digest: str | None = DIGEST) -> RemoteImage:
    return RemoteImage(server.url, digest)


async def fetched(cache: ImageCache, woken: Woken, source: RemoteImage, waiter: str = "vm-1") -> ImageLookup:
    cache.fetch(source, waiter=waiter)
    await woken.wait()
    return cache.lookup(source)


def cached_files(images_dir: Path) -> list[str]:
    cache_dir = images_dir / "sha256"
    return sorted(path.name for path in cache_dir.iterdir()) if cache_dir.exists() else []


def partials(images_dir: Path) -> list[Path]:
    downloads = images_dir / ".downloads"
    return sorted(downloads.iterdir()) if downloads.exists() else []


def has_partial_bytes(images_dir: Path) -> bool:
    found = partials(images_dir)
    return bool(found) and found[0].stat().st_size > 0


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition the server's progress makes true (there is no event to wait on)."""
    for _ in range(int(WAIT_SECONDS / POLL_SECONDS)):
        if condition():
            return
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"not true within {WAIT_SECONDS} s")


# ---- downloads ------------------------------------------------------------------------------


async def test_a_download_is_verified_and_cached_by_digest(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """A fetched URL ends up as sha256/<hex> with the right bytes, and no partial is left."""
    lookup = await fetched(cache, woken, remote(server))
    assert lookup.state is ImageState.READY
    assert lookup.path == images_dir / "sha256" / DIGEST
    assert (images_dir / "sha256" / DIGEST).read_bytes() == IMAGE
    assert partials(images_dir) == []
    assert woken.uids == ["vm-1"]


async def test_a_cached_image_is_not_downloaded_again(
    cache: ImageCache, server: ImageServer, woken: Woken
) -> None:
    """Once cached, lookups say READY for the URL and for sha256:<hex>, and fetch asks nothing."""
    await fetched(cache, woken, remote(server))
    cache.fetch(remote(server), waiter="vm-2")
    assert cache.lookup(remote(server)).state is ImageState.READY
    assert cache.lookup(CachedImage(DIGEST)).state is ImageState.READY
    assert server.image_gets == 1


async def test_concurrent_fetches_share_one_download_and_wake_every_waiter(
    cache: ImageCache, server: ImageServer, woken: Woken
) -> None:
    """Ten VMs asking at once cause one GET, and each of them is woken when it ends."""
    server.stall_after = 1024
    for index in range(10):
        cache.fetch(remote(server), waiter=f"vm-{index}")
    lookup = cache.lookup(remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FETCHING, "ImageDownloading")
    server.release.set()
    await woken.wait()
    assert server.image_gets == 1
    assert sorted(woken.uids) == sorted(f"vm-{index}" for index in range(10))
    assert cache.lookup(remote(server)).state is ImageState.READY


async def test_a_sha256_image_not_in_the_cache_is_missing(cache: ImageCache) -> None:
    """sha256:<hex> with no file is MISSING, ImageNotFound, saying it is not in the cache."""
    lookup = cache.lookup(CachedImage(OTHER_DIGEST))
    assert (lookup.state, lookup.reason) == (ImageState.MISSING, "ImageNotFound")
    assert "not in the image cache" in lookup.message


async def test_a_checksum_mismatch_caches_nothing_and_retries_after_backoff(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path, manual_clock: ManualClock
) -> None:
    """Wrong bytes: FAILED ImageChecksumMismatch naming both digests, nothing kept, no GET
    before retry_at, and a fetch after it works."""
    server.body = b"not the image" * 1000
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageChecksumMismatch")
    assert DIGEST in lookup.message
    assert hashlib.sha256(server.body).hexdigest() in lookup.message
    assert server.url in lookup.message
    assert lookup.retry_at == manual_clock.now() + timedelta(seconds=10)
    assert cached_files(images_dir) == []
    assert partials(images_dir) == []

    cache.fetch(remote(server), waiter="vm-1")
    assert server.image_gets == 1
    server.body = IMAGE
    manual_clock.advance(10)
    assert cache.lookup(remote(server)).state is ImageState.MISSING
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY


async def test_backoff_doubles_and_resets_on_success(
    cache: ImageCache, server: ImageServer, woken: Woken, manual_clock: ManualClock
) -> None:
    """Consecutive failures wait 10 s then 20 s; a success clears the record."""
    server.status = 500
    first = await fetched(cache, woken, remote(server))
    assert first.retry_at == manual_clock.now() + timedelta(seconds=10)
    manual_clock.advance(10)
    second = await fetched(cache, woken, remote(server))
    assert second.retry_at == manual_clock.now() + timedelta(seconds=20)
    manual_clock.advance(20)
    server.status = 200
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY


async def test_http_404_fails_with_the_status(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """A 404 is FAILED, ImageDownloadFailed, and the message says HTTP 404 and the URL."""
    server.status = 404
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert f"HTTP 404 Not Found from {server.url}" in lookup.message
    assert partials(images_dir) == []


async def test_a_connection_failure_fails_the_download(
    cache: ImageCache, woken: Woken, images_dir: Path
) -> None:
    """Nothing listening: FAILED ImageDownloadFailed, and nothing cached."""
    source = RemoteImage("http://127.0.0.1:9/disk.img", DIGEST)
    lookup = await fetched(cache, woken, source)
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert cached_files(images_dir) == []


async def test_an_interrupted_download_resumes_with_a_range_request(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path, manual_clock: ManualClock
) -> None:
    """Half a body then a dropped connection leaves a partial, not a cached file; the next
    fetch asks for the rest with Range and ends with the right bytes."""
    half = len(IMAGE) // 2
    server.cut_after = half
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert cached_files(images_dir) == []
    [partial] = partials(images_dir)
    assert partial.name == f"{DIGEST}.partial"
    kept = partial.stat().st_size
    assert 0 < kept <= half

    manual_clock.advance(10)
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY
    assert server.ranges == [None, f"bytes={kept}-"]
    assert (images_dir / "sha256" / DIGEST).read_bytes() == IMAGE
    assert partials(images_dir) == []


async def test_a_server_ignoring_range_restarts_from_zero(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path, manual_clock: ManualClock
) -> None:
    """A 200 answer to a Range request is taken as the whole file, and the result is right."""
    server.cut_after = len(IMAGE) // 2
    server.honour_range = False
    await fetched(cache, woken, remote(server))
    manual_clock.advance(10)
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY
    assert server.ranges[1] is not None
    assert (images_dir / "sha256" / DIGEST).read_bytes() == IMAGE


async def test_a_complete_partial_is_installed_without_a_download(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """A partial file that already holds the whole image (a crash before the rename) is
    verified and installed without asking the server."""
    downloads = images_dir / ".downloads"
    downloads.mkdir()
    (downloads / f"{DIGEST}.partial").write_bytes(IMAGE)
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY
    assert server.image_gets == 0


async def test_an_oversize_image_is_refused(
    make_cache: CacheFactory, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """An image above max_bytes is refused by its Content-Length, with a clear message."""
    cache = await make_cache(max_bytes=1024 * 1024)
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert "at most 1048576 bytes (image_max_gib)" in lookup.message
    assert cached_files(images_dir) == []
    assert partials(images_dir) == []


async def test_an_oversize_body_without_length_is_refused_while_counting(
    make_cache: CacheFactory, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """A chunked body (no Content-Length) is cut off once it passes max_bytes."""
    server.chunked = True
    cache = await make_cache(max_bytes=1024 * 1024)
    lookup = await fetched(cache, woken, remote(server))
    assert "at most 1048576 bytes (image_max_gib)" in lookup.message
    assert partials(images_dir) == []


async def test_close_cancels_a_running_download_and_keeps_the_partial(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """close() ends a stalled download at once; the partial stays and nothing is cached."""
    server.stall_after = 2 * 1024 * 1024
    cache.fetch(remote(server), waiter="vm-1")
    await wait_until(lambda: has_partial_bytes(images_dir))
    lookup = cache.lookup(remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FETCHING, "ImageDownloading")
    assert "% of 3.0 MiB" in lookup.message
    await asyncio.wait_for(cache.close(), WAIT_SECONDS)
    assert [path.name for path in partials(images_dir)] == [f"{DIGEST}.partial"]
    assert cached_files(images_dir) == []
    assert woken.uids == []
    cache.fetch(remote(server), waiter="vm-2")  # closed: starts nothing, raises nothing
    assert server.image_gets == 1


# ---- sidecars -------------------------------------------------------------------------------


async def test_a_sidecar_gives_the_digest_and_is_remembered_across_restarts(
    make_cache: CacheFactory, server: ImageServer, woken: Woken
) -> None:
    """A `<hex>  name` sidecar is read once; a new cache on the same store knows the digest
    without asking the sidecar again."""
    first = await make_cache()
    source = remote(server, None)
    assert first.lookup(source).state is ImageState.MISSING
    assert (await fetched(first, woken, source)).state is ImageState.READY
    assert first.digest_of(source) == DIGEST

    second = await make_cache()
    assert second.digest_of(source) == DIGEST
    assert second.lookup(source).state is ImageState.READY
    assert (server.sidecar_gets, server.image_gets) == (1, 1)


async def test_a_sidecar_without_a_digest_fails(cache: ImageCache, server: ImageServer, woken: Woken) -> None:
    """A sidecar that names no digest for the file is FAILED, and no image is downloaded."""
    server.sidecar = "no digest here\n"
    lookup = await fetched(cache, woken, remote(server, None))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert "gives no sha256 digest" in lookup.message
    assert server.image_gets == 0


async def test_an_oversize_sidecar_is_refused(cache: ImageCache, server: ImageServer, woken: Woken) -> None:
    """A sidecar above 64 KiB is not a sidecar: FAILED, and no image is downloaded."""
    server.sidecar = f"{DIGEST}  disk.img\n" * 2000
    lookup = await fetched(cache, woken, remote(server, None))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert "larger than 64 KiB" in lookup.message
    assert server.image_gets == 0


async def test_sidecar_and_explicit_digest_share_one_download(
    cache: ImageCache, server: ImageServer, woken: Woken
) -> None:
    """A VM naming the digest and one relying on the sidecar wait on the same download."""
    server.stall_after = 1024
    cache.fetch(remote(server), waiter="vm-1")
    cache.fetch(remote(server, None), waiter="vm-2")
    await wait_until(lambda: server.sidecar_gets > 0)
    server.release.set()
    while len(woken.uids) < 2:
        await woken.wait()
    assert server.image_gets == 1
    assert sorted(woken.uids) == ["vm-1", "vm-2"]


# ---- garbage collection ---------------------------------------------------------------------


def put(images_dir: Path, name: str, *, mtime: float) -> Path:
    path = images_dir / "sha256" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


async def test_gc_respects_grace_and_references(
    cache: ImageCache, images_dir: Path, manual_clock: ManualClock
) -> None:
    """Only unreferenced images unused for longer than the grace go; foreign files stay."""
    now = manual_clock.now().timestamp()
    old, fresh, kept = (hashlib.sha256(bytes([n])).hexdigest() for n in range(3))
    put(images_dir, old, mtime=now - 7200)
    put(images_dir, fresh, mtime=now - 60)
    put(images_dir, kept, mtime=now - 7200)
    put(images_dir, "README", mtime=now - 7200)

    collected = await cache.collect_garbage({kept}, grace=timedelta(hours=1))
    assert collected == [old]
    assert cached_files(images_dir) == sorted(["README", fresh, kept])
    assert partials(images_dir) == []


async def test_a_lookup_marks_an_image_used(
    cache: ImageCache, images_dir: Path, manual_clock: ManualClock
) -> None:
    """A READY lookup refreshes the file's mtime, so a used image outlives the grace."""
    now = manual_clock.now().timestamp()
    put(images_dir, OTHER_DIGEST, mtime=now - 7200)
    assert cache.lookup(CachedImage(OTHER_DIGEST)).state is ImageState.READY
    assert await cache.collect_garbage(set(), grace=timedelta(hours=1)) == []


async def test_gc_removes_stale_partials_and_forgets_collected_sources(
    cache: ImageCache,
    db: Database,
    server: ImageServer,
    woken: Woken,
    images_dir: Path,
    manual_clock: ManualClock,
) -> None:
    """Old partials go, and a collected digest's sidecar row is forgotten."""
    await fetched(cache, woken, remote(server, None))
    downloads = images_dir / ".downloads"
    stale = downloads / f"{OTHER_DIGEST}.partial"
    stale.write_bytes(b"half")
    old = manual_clock.now().timestamp() - 7200
    os.utime(stale, (old, old))
    os.utime(images_dir / "sha256" / DIGEST, (old, old))

    assert await cache.collect_garbage(set(), grace=timedelta(hours=1)) == [DIGEST]
    assert partials(images_dir) == []
    assert await ImageSources(db).all() == []
    assert cache.digest_of(remote(server, None)) is None


async def test_gc_never_touches_a_download_in_progress(
    cache: ImageCache, server: ImageServer, images_dir: Path, manual_clock: ManualClock
) -> None:
    """The partial of a running download stays, however old it looks."""
    server.stall_after = 2 * 1024 * 1024
    cache.fetch(remote(server), waiter="vm-1")
    await wait_until(lambda: has_partial_bytes(images_dir))
    [partial] = partials(images_dir)
    old = manual_clock.now().timestamp() - 7200
    os.utime(partial, (old, old))
    assert await cache.collect_garbage(set(), grace=timedelta(hours=1)) == []
    assert partials(images_dir) == [partial]


# ---- the store ------------------------------------------------------------------------------


async def test_image_sources_upsert_and_forget(db: Database) -> None:
    """A newer sidecar answer replaces the older; forgetting a digest drops its URLs."""
    sources = ImageSources(db)
    await sources.remember("http://a/x.img", OTHER_DIGEST)
    await sources.remember("http://a/x.img", DIGEST)
    await sources.remember("http://b/x.img", DIGEST)
    assert [(row.url, row.digest) for row in await sources.all()] == [
        ("http://a/x.img", DIGEST),
        ("http://b/x.img", DIGEST),
    ]
    await sources.forget_digests([DIGEST])
    assert await sources.all() == []
