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

from typing import Protocol

from api.store.hosts import Hosts
from api.store.sql import Database, Dialect


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


def lease_renewal(db: Database) -> LeaseRenewal:
    """The renewal for `db`'s engine: its own connection on PostgreSQL, a write on SQLite."""
    if db.dialect is Dialect.POSTGRESQL:
        # Imported here: a process on SQLite never loads the PostgreSQL driver.
        from api.store.postgres_renewal import RenewalConnection, url_of

        return RenewalConnection(url_of(db))
    return RenewalByWrite(db)
