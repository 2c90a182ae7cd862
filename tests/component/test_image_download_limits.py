"""Downloads cannot be held hostage: fetches are keyed by (URL, digest), bounded by a deadline,
a minimum rate, a concurrency cap, free space and a size cap, and partial files of VMs that are
gone are collected. Real loopback servers, a real store, a real tmpfs for the free space."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

from api.images import RemoteImage
from api.testing.waiting import wait_until_async
from controller.clock import ManualClock
from controller.images import ImageCache
from controller.images.cache import partial_name
from controller.model import ImageState
from tests.component.image_support import (
    DIGEST,
    IMAGE,
    OTHER_DIGEST,
    CacheFactory,
    ImageServer,
    Woken,
    cached_files,
    fetched,
    has_partial_bytes,
    partials,
    remote,
    serving,
)
from tests.component.image_support import cache as cache  # fixtures, re-exported for pytest
from tests.component.image_support import images_dir as images_dir
from tests.component.image_support import make_cache as make_cache
from tests.component.image_support import manual_clock as manual_clock
from tests.component.image_support import server as server
from tests.component.image_support import tasks as tasks
from tests.component.image_support import woken as woken
from tests.component.test_disk_full import tiny_tmpfs as tiny_tmpfs

# ---- keying ---------------------------------------------------------------------------------


async def test_a_stalled_url_claiming_a_digest_holds_back_no_other_url(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """Project A's URL stalls while claiming the digest of project B's image. B downloads from
    its own URL meanwhile, never sees A's URL, and its install ends A's download: A's VM is
    woken and finds the image cached."""
    async with serving() as hostage:
        hostage.stall_after = 1024
        mine = RemoteImage(hostage.url, DIGEST)
        cache.fetch(mine, waiter="vm-a")
        await wait_until_async(lambda: hostage.image_gets == 1)

        theirs = remote(server)
        lookup = await fetched(cache, woken, theirs, waiter="vm-b")
        assert lookup.state is ImageState.READY
        assert server.image_gets == 1
        await wait_until_async(lambda: len(woken.uids) == 2)
        assert sorted(woken.uids) == ["vm-a", "vm-b"]
        assert cache.lookup(mine).state is ImageState.READY
        assert (images_dir / "sha256" / DIGEST).read_bytes() == IMAGE


async def test_a_lookup_shows_only_its_own_url(cache: ImageCache, server: ImageServer) -> None:
    """While A's URL downloads a digest, B's URL of the same digest is not "downloading A's
    URL": B's own fetch runs, and each lookup names its own URL."""
    async with serving() as other:
        server.stall_after = other.stall_after = 1024
        first, second = remote(server), RemoteImage(other.url, DIGEST)
        cache.fetch(first, waiter="vm-a")
        cache.fetch(second, waiter="vm-b")
        await wait_until_async(lambda: server.image_gets == other.image_gets == 1)
        assert server.url in cache.lookup(first).message
        assert other.url not in cache.lookup(first).message
        assert other.url in cache.lookup(second).message
        assert server.url not in cache.lookup(second).message


# ---- time -----------------------------------------------------------------------------------


async def test_a_slow_drip_is_cut_by_the_minimum_rate_and_kept_for_a_resume(
    make_cache: CacheFactory, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """20 KiB/s against a 200 KiB/s floor over 0.3 s windows: FAILED within about a window,
    saying so; what arrived stays as the partial file."""
    server.drip = (1024, 0.05)
    cache = await make_cache(min_bytes_per_second=200 * 1024, rate_window=0.3, deadline=30.0)
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert lookup.message == (
        f"{server.url}: slower than 200 KiB/s over 0.3 s (image_download_min_kib_per_second);"
        " what arrived is kept to resume from"
    )
    assert has_partial_bytes(images_dir)
    assert cached_files(images_dir) == []


async def test_the_total_deadline_cuts_a_download_that_keeps_its_rate_and_the_next_resumes(
    make_cache: CacheFactory, server: ImageServer, woken: Woken, images_dir: Path, manual_clock: ManualClock
) -> None:
    """A steady 1.6 MB/s download of 3 MiB against a 0.5 s deadline fails on the deadline with
    a partial file; the retry asks for the rest with Range and installs the right bytes."""
    server.drip = (32 * 1024, 0.02)
    cache = await make_cache(deadline=0.5, min_bytes_per_second=0)
    lookup = await fetched(cache, woken, remote(server))
    assert lookup.message == (
        f"{server.url}: not downloaded within 0.5 s (image_download_deadline_seconds);"
        " what arrived is kept to resume from"
    )
    [partial] = partials(images_dir)
    kept = partial.stat().st_size
    assert 0 < kept < len(IMAGE)

    server.drip = None
    manual_clock.advance(10)
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY
    assert server.ranges == [None, f"bytes={kept}-"]


async def test_downloads_beyond_the_cap_wait_for_a_slot(
    make_cache: CacheFactory, server: ImageServer, woken: Woken
) -> None:
    """With one slot, a second URL's download starts only once the first ends; meanwhile its
    lookup says it waits for a slot."""
    cache = await make_cache(max_concurrent=1)
    async with serving() as other:
        other.body = b"another image" * 1000
        second = RemoteImage(other.url, None)
        other.sidecar = f"{hashlib.sha256(other.body).hexdigest()}  disk.img\n"
        server.stall_after = 1024
        cache.fetch(remote(server), waiter="vm-1")
        await wait_until_async(lambda: server.image_gets == 1)
        cache.fetch(second, waiter="vm-2")
        lookup = cache.lookup(second)
        assert lookup.message == f"{other.url}: waiting for one of the 1 download slots"
        assert (other.sidecar_gets, other.image_gets) == (0, 0)
        server.release.set()
        await wait_until_async(lambda: len(woken.uids) == 2)
        assert cache.lookup(second).state is ImageState.READY
        assert (other.sidecar_gets, other.image_gets) == (1, 1)


# ---- space ----------------------------------------------------------------------------------


async def test_too_little_free_space_fails_before_the_body_and_works_once_freed(
    make_cache: CacheFactory, server: ImageServer, woken: Woken, tiny_tmpfs: Path, manual_clock: ManualClock
) -> None:
    """On a 4 MiB tmpfs with 1 MiB left, a 3 MiB image fails by its Content-Length before a
    byte is written (no ENOSPC halfway); freed, the retry downloads it."""
    images = tiny_tmpfs / "images"
    images.mkdir()
    filler = tiny_tmpfs / "filler"
    stat = os.statvfs(tiny_tmpfs)
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 2**20))
    cache = await make_cache(directory=images)
    lookup = await fetched(cache, woken, remote(server))
    assert (lookup.state, lookup.reason) == (ImageState.FAILED, "ImageDownloadFailed")
    assert lookup.message.startswith(f"{server.url}: the images dir has too little free space")
    assert partials(images) == []

    filler.unlink()
    manual_clock.advance(10)
    assert (await fetched(cache, woken, remote(server))).state is ImageState.READY
    assert (images / "sha256" / DIGEST).read_bytes() == IMAGE


async def test_free_space_counts_what_running_downloads_still_need(
    make_cache: CacheFactory, server: ImageServer, woken: Woken, tiny_tmpfs: Path
) -> None:
    """With room for one 3 MiB image but not two, a second download fails while the first
    still needs its bytes, although the disk's free space alone would let it start."""
    images = tiny_tmpfs / "images"
    (images / ".downloads").mkdir(parents=True)
    cache = await make_cache(directory=images)
    stat = os.statvfs(tiny_tmpfs)
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - len(IMAGE) - 2**19))
    server.stall_after = 1024
    cache.fetch(remote(server), waiter="vm-1")
    await wait_until_async(lambda: server.image_gets == 1)
    async with serving() as other:
        other.body = os.urandom(len(IMAGE))
        second = RemoteImage(other.url, hashlib.sha256(other.body).hexdigest())
        lookup = await fetched(cache, woken, second, waiter="vm-2")
        assert lookup.message.startswith(f"{other.url}: the images dir has too little free space")
        assert other.image_gets == 1
    server.release.set()
    await woken.wait()
    assert cache.lookup(remote(server)).state is ImageState.READY


# ---- partial files --------------------------------------------------------------------------


async def test_gc_removes_partials_of_gone_vms_at_once_and_keeps_referenced_ones(
    cache: ImageCache, server: ImageServer, woken: Woken, images_dir: Path
) -> None:
    """A fresh partial whose digest no live VM references goes at the next collection, and so
    does one of a digest already cached; a referenced one stays for its resume."""
    await fetched(cache, woken, remote(server))
    downloads = images_dir / ".downloads"
    referenced = hashlib.sha256(b"referenced").hexdigest()
    files = {
        name: downloads / partial_name("http://127.0.0.1:1/x.img", digest)
        for name, digest in (("gone", OTHER_DIGEST), ("cached", DIGEST), ("kept", referenced))
    }
    for path in files.values():
        path.write_bytes(b"half")
    await cache.collect_garbage({DIGEST, referenced}, grace=timedelta(days=1))
    assert partials(images_dir) == [files["kept"]]
