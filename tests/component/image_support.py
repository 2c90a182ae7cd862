"""Shared parts of the image cache tests: a loopback image server that counts what it was asked,
a cache factory with test-sized limits, and waiting helpers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestServer

from api.images import RemoteImage
from api.store import Database
from api.store.image_sources import ImageSources
from controller.clock import ManualClock
from controller.images import EgressPolicy, FetchLimits, ImageCache, parse_networks
from controller.model import ImageLookup

IMAGE = os.urandom(3 * 1024 * 1024 + 123)
DIGEST = hashlib.sha256(IMAGE).hexdigest()
OTHER_DIGEST = hashlib.sha256(b"something else").hexdigest()
WAIT_SECONDS = 10.0
TEST_LIMITS: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 2.0}
POLL_SECONDS = 0.01
# The loopback image server stands for a local mirror, allowed as an operator would allow one.
LOOPBACK_MIRROR = EgressPolicy(parse_networks("127.0.0.1/32"))


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
    # Send the body in pieces of this many bytes, this many seconds apart (a slow link).
    drip: tuple[int, float] | None = None
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
        if self.drip is not None:
            size, pause = self.drip
            while len(body) > size:
                await response.write(body[:size])
                body = body[size:]
                await asyncio.sleep(pause)
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


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[ImageServer]:
    """An ImageServer listening on 127.0.0.1."""
    image_server = ImageServer()
    app = web.Application()
    app.router.add_get("/disk.img", image_server.image)
    app.router.add_get("/disk.img.sha256", image_server.sidecar_file)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    image_server.url = str(test_server.make_url("/disk.img"))
    try:
        yield image_server
    finally:
        image_server.release.set()
        await test_server.close()


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    async with serving() as image_server:
        yield image_server


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

    async def make(
        *,
        max_bytes: int = 64 * 2**30,
        egress: EgressPolicy = LOOPBACK_MIRROR,
        resolver: AbstractResolver | None = None,
        directory: Path | None = None,
        **limits: Any,
    ) -> ImageCache:
        cache = ImageCache(
            images_dir=directory or images_dir,
            sources=ImageSources(db),
            tasks=tasks,
            wake=woken,
            clock=manual_clock,
            limits=FetchLimits(max_bytes=max_bytes, **{**TEST_LIMITS, **limits}),
            egress=egress,
            resolver=resolver,
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
