"""Host ports and disk files held by VMs: the controller's ledger of what it must release.

A row exists before the resource is used (a port before QEMU binds it, a disk before its file is
created) and goes only after the resource is released, so a controller killed at any point
finds everything it might hold listed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from api.store.db import Database
from api.store.records import DiskHeld as DiskHeld
from api.store.records import DiskOwner as DiskOwner
from api.store.records import DiskRow as DiskRow
from api.store.records import PortRow as PortRow
from api.store.records import PortTaken as PortTaken
from api.store.sql import IntegrityError, Row
from api.types import Protocol, ReclaimPolicy

_DISK_COLUMNS = "uid, name, path, reclaim_policy, size_mib, base, project, vm_name"


def _disk_row(row: Row | Sequence[Any]) -> DiskRow:
    """A row of the columns uid, name, path, reclaim_policy, size_mib, base, project, vm_name."""
    uid, name, path, policy, size_mib, base, project, vm_name = row
    owner = DiskOwner(str(project), str(vm_name)) if project is not None and vm_name is not None else None
    return DiskRow(
        str(uid),
        str(name),
        str(path),
        ReclaimPolicy(policy),
        size_mib if isinstance(size_mib, int) else None,
        base if isinstance(base, str) else None,
        owner,
    )


class Allocations:
    """The ledger of one host (`host`; '' before hosts existed): ports and disks are local.
    `every_host`: the listings (`ports`, `disks`, `retained_disks`) show every host's rows, as
    the API lists them; it never writes."""

    def __init__(self, db: Database, *, host: str = "", every_host: bool = False) -> None:
        self._db = db
        self._host = host
        self._listed = "TRUE" if every_host else "host = ?"
        self._listed_params: tuple[str, ...] = () if every_host else (host,)

    async def held_by(self, uid: str) -> tuple[list[PortRow], list[DiskRow]]:
        """The ports and disks `uid` holds, in one read (every observe asks)."""
        # Each column holds one type in both kinds of row (PostgreSQL's UNION requires it).
        rows = await self._db.read(
            "SELECT 'port', uid, protocol, NULL, NULL, NULL, NULL, NULL, NULL, guest_port, host_port"
            " FROM port_allocations WHERE uid = ? AND host = ?"
            " UNION ALL SELECT 'disk', uid, name, path, reclaim_policy, size_mib, base, project, vm_name,"
            " NULL, NULL FROM disks WHERE uid = ? AND host = ?"
            " ORDER BY 1, 3, 10, 4",
            (uid, self._host, uid, self._host),
        )
        ports = [PortRow(uid, Protocol(r[2]), r[9], r[10]) for r in rows if r[0] == "port"]
        disks = [_disk_row(r[1:9]) for r in rows if r[0] == "disk"]
        return ports, disks

    async def ports(self) -> list[PortRow]:
        """Every held port (`held_by` for one VM's)."""
        rows = await self._db.read(
            f"SELECT uid, protocol, guest_port, host_port FROM port_allocations WHERE {self._listed}"  # noqa: S608
            " ORDER BY host_port",
            self._listed_params,
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
                    "INSERT INTO port_allocations (uid, protocol, guest_port, host_port, created_at, host)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (host, uid, protocol, guest_port) DO NOTHING",
                    (uid, protocol.value, guest_port, host_port, self._db.clock().isoformat(), self._host),
                )
                row = await conn.fetchone(
                    "SELECT host_port FROM port_allocations"
                    " WHERE uid = ? AND protocol = ? AND guest_port = ? AND host = ?",
                    (uid, protocol.value, guest_port, self._host),
                )
        except IntegrityError as err:
            raise PortTaken(f"host port {protocol.value}/{host_port} is held by another VM") from err
        assert row is not None
        return int(row[0])

    async def release_ports(self, uid: str, keys: list[tuple[Protocol, int]]) -> None:
        """Forget the given forwards' ports. Releasing a port not held is success."""
        async with self._db.write() as conn:
            await conn.executemany(
                "DELETE FROM port_allocations WHERE uid = ? AND protocol = ? AND guest_port = ? AND host = ?",
                [(uid, protocol.value, guest_port, self._host) for protocol, guest_port in keys],
            )

    async def disks(self) -> list[DiskRow]:
        """Every recorded disk (`held_by` for one VM's)."""
        rows = await self._db.read(
            f"SELECT {_DISK_COLUMNS} FROM disks WHERE {self._listed} ORDER BY uid, name",  # noqa: S608
            self._listed_params,
        )
        return [_disk_row(r) for r in rows]

    async def retained_disks(self) -> list[DiskRow]:
        """Disks whose VM is gone: kept by `reclaimPolicy: Retain` for a VM of the same name."""
        rows = await self._db.read(
            f"SELECT {_DISK_COLUMNS} FROM disks WHERE {self._listed}"  # noqa: S608
            " AND uid NOT IN (SELECT uid FROM vms) ORDER BY project, vm_name, name",
            self._listed_params,
        )
        return [_disk_row(r) for r in rows]

    async def record_disk(self, uid: str, disk: DiskRow) -> None:
        """Record a disk before its file is created (so a crash in between leaks nothing).

        Recording again updates the policy, size and base (a retried creation may learn them).
        """
        owner = disk.owner
        async with self._db.write() as conn:
            await conn.execute(
                "INSERT INTO disks (uid, name, path, reclaim_policy, created_at, size_mib, base,"
                " project, vm_name, host) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (host, uid, name) DO UPDATE SET reclaim_policy = excluded.reclaim_policy,"
                " size_mib = excluded.size_mib, base = excluded.base",
                (
                    uid,
                    disk.name,
                    disk.path,
                    disk.reclaim_policy.value,
                    self._db.clock().isoformat(),
                    disk.size_mib,
                    disk.base,
                    owner.project if owner else None,
                    owner.vm_name if owner else None,
                    self._host,
                ),
            )

    async def adopt_retained_disk(self, uid: str, owner: DiskOwner, name: str) -> DiskRow | None:
        """Give `uid` the retained disk `name` of a gone VM with the same project and name.

        The file stays where it is (the row keeps its path), so adoption is one atomic update.
        :raise DiskHeld: the disk still belongs to a VM that is being deleted.
        """
        async with self._db.write() as conn:
            found = await conn.fetchone(
                "SELECT uid, name, path, reclaim_policy, size_mib, base, project, vm_name,"
                " uid IN (SELECT uid FROM vms) FROM disks"
                " WHERE project = ? AND vm_name = ? AND name = ? AND uid != ? AND host = ?"
                " AND reclaim_policy = 'Retain' ORDER BY created_at LIMIT 1",
                (owner.project, owner.vm_name, name, uid, self._host),
            )
            if found is None:
                return None
            row = _disk_row(tuple(found)[:-1])
            if found[-1]:
                raise DiskHeld(
                    f"disk {name!r} is retained by the deleted VM {owner.vm_name!r} ({row.uid}),"
                    " which is still being torn down"
                )
            await conn.execute(
                "DELETE FROM disks WHERE uid = ? AND name = ? AND host = ?", (uid, name, self._host)
            )
            await conn.execute(
                "UPDATE disks SET uid = ? WHERE uid = ? AND name = ? AND host = ?",
                (uid, row.uid, name, self._host),
            )
        return DiskRow(uid, name, row.path, row.reclaim_policy, row.size_mib, row.base, row.owner)

    async def set_disk_size(self, uid: str, name: str, size_mib: int) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                "UPDATE disks SET size_mib = ? WHERE uid = ? AND name = ? AND host = ?",
                (size_mib, uid, name, self._host),
            )

    async def forget_disk(self, uid: str, name: str) -> None:
        """Forget a disk after its file is gone. Idempotent."""
        async with self._db.write() as conn:
            await conn.execute(
                "DELETE FROM disks WHERE uid = ? AND name = ? AND host = ?", (uid, name, self._host)
            )
