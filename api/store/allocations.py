"""Host ports and disk files held by VMs: the controller's ledger of what it must release.

A row exists before the resource is used (a port before QEMU binds it, a disk before its file is
created) and goes only after the resource is released, so a controller killed at any point
finds everything it might hold listed here.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from api.store.db import Database
from api.types import Protocol, ReclaimPolicy


class PortTaken(Exception):
    """Another VM holds this host port. Pick another (or report it, if the spec asked for it)."""


@dataclass(frozen=True, slots=True)
class PortRow:
    uid: str
    protocol: Protocol
    guest_port: int
    host_port: int


@dataclass(frozen=True, slots=True)
class DiskRow:
    uid: str
    name: str
    path: str
    reclaim_policy: ReclaimPolicy


class Allocations:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def held_by(self, uid: str) -> tuple[list[PortRow], list[DiskRow]]:
        """The ports and disks `uid` holds, in one read (every observe asks)."""
        rows = await self._db.read(
            "SELECT 'port', protocol, guest_port, host_port, NULL FROM port_allocations WHERE uid = ?"
            " UNION ALL SELECT 'disk', name, path, reclaim_policy, NULL FROM disks WHERE uid = ?"
            " ORDER BY 1, 2, 3",
            (uid, uid),
        )
        ports = [PortRow(uid, Protocol(r[1]), r[2], r[3]) for r in rows if r[0] == "port"]
        disks = [DiskRow(uid, r[1], r[2], ReclaimPolicy(r[3])) for r in rows if r[0] == "disk"]
        return ports, disks

    async def ports(self) -> list[PortRow]:
        """Every held port (`held_by` for one VM's)."""
        rows = await self._db.read(
            "SELECT uid, protocol, guest_port, host_port FROM port_allocations ORDER BY host_port"
        )
        return [PortRow(r[0], Protocol(r[1]), r[2], r[3]) for r in rows]

    async def reserve_port(self, uid: str, protocol: Protocol, guest_port: int, host_port: int) -> int:
        """Record that `uid` holds `host_port` for its forward of `guest_port`; idempotent.

        Returns the host port `uid` holds for that forward: `host_port`, or the one it already
        had (a retried reservation must never look like a clash with itself).

        :raise PortTaken: another VM already holds `host_port`.
        """
        try:
            async with self._db.write() as conn:
                await conn.execute(
                    "INSERT INTO port_allocations (uid, protocol, guest_port, host_port, created_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (uid, protocol, guest_port) DO NOTHING",
                    (uid, protocol.value, guest_port, host_port, self._db.clock().isoformat()),
                )
                async with conn.execute(
                    "SELECT host_port FROM port_allocations"
                    " WHERE uid = ? AND protocol = ? AND guest_port = ?",
                    (uid, protocol.value, guest_port),
                ) as cursor:
                    row = await cursor.fetchone()
        except sqlite3.IntegrityError as err:
            raise PortTaken(f"host port {protocol.value}/{host_port} is held by another VM") from err
        assert row is not None
        return int(row[0])

    async def release_ports(self, uid: str, keys: list[tuple[Protocol, int]]) -> None:
        """Forget the given forwards' ports. Releasing a port not held is success."""
        async with self._db.write() as conn:
            await conn.executemany(
                "DELETE FROM port_allocations WHERE uid = ? AND protocol = ? AND guest_port = ?",
                [(uid, protocol.value, guest_port) for protocol, guest_port in keys],
            )

    async def disks(self) -> list[DiskRow]:
        """Every recorded disk (`held_by` for one VM's)."""
        rows = await self._db.read("SELECT uid, name, path, reclaim_policy FROM disks ORDER BY uid, name")
        return [DiskRow(r[0], r[1], r[2], ReclaimPolicy(r[3])) for r in rows]

    async def record_disk(self, uid: str, name: str, path: str, policy: ReclaimPolicy) -> None:
        """Record a disk before its file is created (so a crash in between leaks nothing)."""
        async with self._db.write() as conn:
            await conn.execute(
                "INSERT INTO disks (uid, name, path, reclaim_policy, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (uid, name) DO UPDATE SET reclaim_policy = excluded.reclaim_policy",
                (uid, name, path, policy.value, self._db.clock().isoformat()),
            )

    async def forget_disk(self, uid: str, name: str) -> None:
        """Forget a disk after its file is gone. Idempotent."""
        async with self._db.write() as conn:
            await conn.execute("DELETE FROM disks WHERE uid = ? AND name = ?", (uid, name))
