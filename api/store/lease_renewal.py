"""A host's lease renewal, kept out of the queue of other writes (docs/multi-host.md, "Fencing").

A renewal is one statement on one row: `UPDATE hosts SET lease_renewed_at = now() WHERE name = ?
AND epoch = ?`. Through `Database.write` it would wait for this process's other writes (one at
a time) and then for the advisory lock that serialises every process's writes: under load a
controller's renewal queued for seconds behind status writes, its lease looked lost to itself,
and it fenced its own healthy VMs. On PostgreSQL it runs on a connection of its own, in
autocommit, without the advisory lock: nothing it does needs other writes kept out. A
concurrent move of the host's VMs (`Hosts.reschedule`, `drain --force`) bumps the epoch in an
UPDATE of the same row, so the two are ordered by the row lock and a renewal after the move
finds the epoch stale.

SQLite has one machine and one writer: the renewal stays an ordinary write there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

import psycopg

from api.store.hosts import Hosts
from api.store.postgres import CONNECT_TIMEOUT_SECONDS, PostgresDatabase, unavailable_on_connection_errors
from api.store.sql import Database

RENEW = "UPDATE hosts SET lease_renewed_at = %s WHERE name = %s AND epoch = %s"


class LeaseRenewal(Protocol):
    async def renew(self, name: str, epoch: int) -> bool:
        """Stamp `name`'s lease with the database's clock. False: the host is not registered or
        no longer at `epoch` (fenced). :raise StoreUnavailable: the server cannot be reached."""

    async def close(self) -> None: ...


class RenewalByWrite:
    """The renewal as an ordinary write transaction (SQLite)."""

    def __init__(self, db: Database) -> None:
        self._hosts = Hosts(db)

    async def renew(self, name: str, epoch: int) -> bool:
        return await self._hosts.renew(name, epoch)

    async def close(self) -> None:
        pass


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


def lease_renewal(db: Database) -> LeaseRenewal:
    """The renewal for `db`'s engine: its own connection on PostgreSQL, a write on SQLite."""
    if isinstance(db, PostgresDatabase):
        return RenewalConnection(db.url)
    return RenewalByWrite(db)
