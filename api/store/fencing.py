"""Epoch fencing of a host's writes (docs/multi-host.md, "Fencing").

Every registration of a host takes the next epoch, and so does every move of VMs away from a
host that may still run them (the scheduler rescheduling a lost host's VMs, `drain --force`).
A controller's store is a `FencedDatabase`: each of its write transactions first reads its
host's epoch, and one that is no longer the epoch it registered with is refused with
`StaleEpoch`, rolled back, before it changes anything. So a controller that froze and wakes
cannot write the status, ports, disks or events of VMs that moved away meanwhile.

On PostgreSQL the epoch is read `FOR SHARE`: a registration or a move of the same host waits
for the write to commit, so no write commits under an epoch that is already stale. SQLite
serialises every write transaction anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime

from api.store.errors import StoreError
from api.store.sql import Database, Dialect, Row, Transaction


class StaleEpoch(StoreError):
    """This host registered again, or its VMs were moved away, since this controller took its
    epoch: nothing was written. The controller checks what is still its own, kills the rest,
    and registers again (controller/host_agent.py)."""


async def current_epoch(conn: Transaction, dialect: Dialect, host: str) -> int | None:
    """The host's epoch inside a write transaction (None: no such host), locked against a
    concurrent bump on PostgreSQL."""
    lock = " FOR SHARE" if dialect is Dialect.POSTGRESQL else ""
    row = await conn.fetchone(f"SELECT epoch FROM hosts WHERE name = ?{lock}", (host,))  # noqa: S608
    return None if row is None else int(row[0])


async def check_epoch(conn: Transaction, dialect: Dialect, host: str, epoch: int) -> None:
    """:raise StaleEpoch: `host` is no longer at `epoch`."""
    found = await current_epoch(conn, dialect, host)
    if found != epoch:
        raise StaleEpoch(f"host {host} is at epoch {found}, this controller registered at epoch {epoch}")


class FencedDatabase:
    """A `Database` whose write transactions are refused once `host`'s epoch moved on.

    Until `epoch` is set (at registration) writes are not checked. `on_stale` is called before
    `StaleEpoch` is raised, so the controller fences at once, whatever write noticed it."""

    def __init__(self, db: Database, host: str, *, on_stale: Callable[[], None] = lambda: None) -> None:
        self._db = db
        self.host = host
        self.epoch: int | None = None
        self.on_stale = on_stale
        self.clock = db.clock
        self.dialect = db.dialect

    def subscribe(self, callback: Callable[[], None], *, volatile: bool = True) -> None:
        self._db.subscribe(callback, volatile=volatile)

    async def data_version(self) -> int:
        return await self._db.data_version()

    async def read(self, query: str, params: Sequence[object] = ()) -> list[Row]:
        return await self._db.read(query, params)

    @contextlib.asynccontextmanager
    async def write(self, *, durable: bool = True, notify: bool = True) -> AsyncIterator[Transaction]:
        """:raise StaleEpoch: the host's epoch moved on; nothing was written."""
        async with self._db.write(durable=durable, notify=notify) as conn:
            if self.epoch is not None:
                try:
                    await check_epoch(conn, self.dialect, self.host, self.epoch)
                except StaleEpoch:
                    self.on_stale()
                    raise
            yield conn

    async def database_now(self) -> datetime:
        return await self._db.database_now()

    async def truncate_wal(self) -> None:
        await self._db.truncate_wal()

    async def probe_writable(self) -> None:
        await self._db.probe_writable()

    async def close(self) -> None:
        await self._db.close()
