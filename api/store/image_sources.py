"""What URLs' `.sha256` sidecars said: the digest each URL's image had when it was fetched.

The image cache keeps its files by digest only, so without this a restarted controller would
have to ask the sidecar's host again before it could find an image it already has (and could
not start a VM while that host is down). A row says nothing about whether the file is cached:
the cache forgets the rows of the digests it collects.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from api.store.db import Database


@dataclass(frozen=True, slots=True)
class ImageSourceRow:
    url: str
    digest: str
    fetched_at: datetime


class ImageSources:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def all(self) -> list[ImageSourceRow]:
        """Every remembered URL (a few per base image in use: read once at start)."""
        rows = await self._db.read("SELECT url, digest, fetched_at FROM image_sources ORDER BY url")
        return [ImageSourceRow(str(r[0]), str(r[1]), datetime.fromisoformat(r[2])) for r in rows]

    async def remember(self, url: str, digest: str) -> None:
        """Record what `url`'s sidecar said now; a newer answer replaces the older one.

        :raise StorageFull: the data dir is full; nothing was recorded.
        """
        async with self._db.write() as conn:
            await conn.execute(
                "INSERT INTO image_sources (url, digest, fetched_at) VALUES (?, ?, ?)"
                " ON CONFLICT (url) DO UPDATE SET digest = excluded.digest, fetched_at = excluded.fetched_at",
                (url, digest, self._db.clock().isoformat()),
            )

    async def forget_digests(self, digests: Collection[str]) -> None:
        """Forget every URL that named one of `digests` (their files were collected). Idempotent."""
        if not digests:
            return
        async with self._db.write() as conn:
            await conn.executemany("DELETE FROM image_sources WHERE digest = ?", [(d,) for d in digests])
