"""A host's lease renewal on a PostgreSQL connection of its own (api/store/lease_renewal.py says
why); imported only when the store is PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from api.store.postgres import CONNECT_TIMEOUT_SECONDS, PostgresDatabase, unavailable_on_connection_errors
from api.store.sql import Database

RENEW = "UPDATE hosts SET lease_renewed_at = %s WHERE name = %s AND epoch = %s"


def url_of(db: Database) -> str:
    """The URL of a PostgreSQL store. :raise TypeError: `db` is not one."""
    if not isinstance(db, PostgresDatabase):
        raise TypeError(f"not a PostgreSQL store: {type(db).__name__}")
    return db.url


class RenewalConnection:
    """The renewal on a PostgreSQL connection of its own, made again after it breaks."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: psycopg.AsyncConnection[Any] | None = None

    async def renew(self, name: str, epoch: int) -> bool:
        with unavailable_on_connection_errors():
            try:
                connection = await self._connected()
                cursor = await connection.execute("SELECT now()")
                row = await cursor.fetchone()
                assert row is not None
                assert isinstance(row[0], datetime)
                cursor = await connection.execute(RENEW, (row[0].isoformat(), name, epoch))
                return cursor.rowcount > 0
            except BaseException:
                # Broken, or left mid-statement by a timeout: not used again.
                await self.close()
                raise

    async def _connected(self) -> psycopg.AsyncConnection[Any]:
        if self._connection is None or self._connection.closed:
            self._connection = await psycopg.AsyncConnection.connect(
                self._url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_SECONDS)
            )
        return self._connection

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
