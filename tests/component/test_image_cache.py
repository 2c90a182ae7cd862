"""ImageCache and its downloads against a real loopback HTTP server and a real store: single
flight, verification, resume, failures and their backoff, sidecars, and garbage collection."""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import timedelta
from pathlib import Path

from api.images import CachedImage, RemoteImage
from api.store import Database
from api.store.image_sources import ImageSources
from api.testing.waiting import wait_until_async
from controller.clock import ManualClock
from controller.images import ImageCache
from controller.images.cache import partial_name
from controller.model import ImageState
from tests.component.image_support import (
    DIGEST,
    IMAGE,
    OTHER_DIGEST,
    WAIT_SECONDS,
    CacheFactory,
    ImageServer,
    Woken,
    cached_files,
    fetched,
    has_partial_bytes,
    partials,
    remote,
)
from tests.component.image_support import cache as cache  # fixtures, re-exported for pytest
from tests.component.image_support import images_dir as images_dir
from tests.component.image_support import make_cache as make_cache
from tests.component.image_support import manual_clock as manual_clock
from tests.component.image_support import server as server
from tests.component.image_support import tasks as tasks
from tests.component.image_support import woken as woken

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
    """Wrong bytes: FAILED ImageChecksumMismatch naming the spec's digest but not the digest of
    what the server sent, nothing kept, no GET before retry_at, and a fetch after it works."""
    server.body = b"not the image" * 1000
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageChecksumMismatch")
    assert (
        lookup.message
        == f"{server.url}: the downloaded file does not match sha256 {DIGEST}; nothing was cached"
    )
    assert hashlib.sha256(server.body).hexdigest() not in lookup.message
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
    """A 404 is FAILED, ImageDownloadFailed, and the message gives the status class and the URL,
    not the status line (whose reason phrase the server chose)."""
    server.status = 404
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert lookup.message == f"{server.url}: HTTP error 4xx"
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
    assert partial.name == partial_name(server.url, DIGEST)
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
    (downloads / partial_name(server.url, DIGEST)).write_bytes(IMAGE)
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
    await wait_until_async(lambda: has_partial_bytes(images_dir))
    lookup = cache.lookup(remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FETCHING, "ImageDownloading")
    assert "% of 3.0 MiB" in lookup.message
    await asyncio.wait_for(cache.close(), WAIT_SECONDS)
    assert [path.name for path in partials(images_dir)] == [partial_name(server.url, DIGEST)]
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
    await wait_until_async(lambda: server.sidecar_gets > 0)
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
    await wait_until_async(lambda: has_partial_bytes(images_dir))
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
