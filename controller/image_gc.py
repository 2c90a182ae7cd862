"""Removing cached base images nothing needs any more.

An image is needed while a live VM's spec names it (by digest, or by a URL whose digest is
known) or while a disk file overlays it: deleting that base would corrupt the disk, and a
retained disk keeps its VM's image alive as long as the disk exists. The same referenced set
decides partial downloads: one whose digest no live spec names belongs to VMs that are gone and
goes at the next collection (ImageCache.collect_garbage).
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import PurePath
from typing import Protocol

import structlog
from pydantic import ValidationError

from api.images import CACHE_DIR_NAME, CachedImage, RemoteImage
from api.store import Database
from api.store.allocations import Allocations
from api.store.fleet import live_specs
from api.store.sql import FAILURES
from api.types import QemuVMSpec

log = structlog.get_logger(__name__)
GC_PERIOD_SECONDS = 600.0


class ImageCollector(Protocol):
    def digest_of(self, source: CachedImage | RemoteImage) -> str | None: ...

    async def collect_garbage(self, referenced: set[str], *, grace: timedelta) -> list[str]: ...


async def referenced_digests(db: Database, allocations: Allocations, images: ImageCollector) -> set[str]:
    """Digests of the cached images that live specs name or existing disks overlay."""
    referenced: set[str] = set()
    for live in await live_specs(db):
        try:
            spec = QemuVMSpec.model_validate(json.loads(live.spec))
        except (ValidationError, ValueError):
            continue
        for disk in spec.disks:
            source = disk.source
            if isinstance(source, CachedImage | RemoteImage):
                digest = images.digest_of(source)
                if digest is not None:
                    referenced.add(digest)
    for row in await allocations.disks():
        if row.base is not None:
            base = PurePath(row.base)
            if base.parent.name == CACHE_DIR_NAME:
                referenced.add(base.name)
    return referenced


async def collect_images_forever(
    db: Database,
    allocations: Allocations,
    images: ImageCollector,
    *,
    grace: timedelta,
    period: float = GC_PERIOD_SECONDS,
) -> None:
    """Every `period` seconds, remove cached images unreferenced for longer than `grace`."""
    while True:
        await asyncio.sleep(period)
        try:
            referenced = await referenced_digests(db, allocations, images)
            removed = await images.collect_garbage(referenced, grace=grace)
        except (*FAILURES, OSError) as err:
            # The next period tries again; nothing is removed on a failed look.
            log.warning("image_gc_failed", error=str(err))
            continue
        if removed:
            log.info("images_collected", digests=removed)
