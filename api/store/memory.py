"""An in-memory store for the controller: the fake of api/store/contracts.py, shipped beside it.

Passes the same contract tests as SQLite (tests/component/test_store_contract.py), so a table
test of the reconciler built on it means what it says. Not for production: nothing persists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from api.store.records import (
    DiskHeld,
    DiskOwner,
    DiskRow,
    NewEvent,
    PortRow,
    PortTaken,
    StatusConflict,
    VMRecord,
)
from api.types import Protocol as PortProtocol
from api.types import ReclaimPolicy


def _encode(status: dict[str, Any]) -> str:
    return json.dumps(status, sort_keys=True, separators=(",", ":"))


class MemoryStore:
    """VMObjects, StatusStore, AllocationLedger and EventSink over dicts."""

    def __init__(self) -> None:
        self._vms: dict[str, VMRecord] = {}
        self._version = 0
        self._ports: dict[tuple[str, PortProtocol, int], int] = {}
        # (uid, name) -> row, in creation order.
        self._disks: dict[tuple[str, str], DiskRow] = {}
        self.events: list[NewEvent] = []
        # Every status written, in order: what a test asserts on to count writes.
        self.status_writes: list[tuple[str, dict[str, Any]]] = []
        # The events of every write that stored some (a `record`, a `write_status`), in order.
        self.event_writes: list[tuple[NewEvent, ...]] = []
        # Store writes that change something, as the SQL store commits them: a status with its
        # events is one; an unchanged status with no events is none.
        self.transactions = 0

    # The API's side, for tests: put, delete.
    def put(self, record: VMRecord) -> None:
        """Create or replace an object (as a state write would)."""
        self._version += 1
        self._vms[record.uid] = replace(record, resource_version=self._version)

    def delete(self, uid: str, at: datetime | None = None) -> None:
        """Mark `uid` for deletion (its deletionTimestamp), as a state without it would."""
        self.put(replace(self._vms[uid], deleted_at=at or datetime.now(UTC)))

    # VMObjects and StatusStore.
    async def get(self, uid: str) -> VMRecord | None:
        return self._vms.get(uid)

    async def versions(self) -> dict[str, int]:
        return {uid: record.resource_version for uid, record in self._vms.items()}

    async def write_status(self, uid: str, status: dict[str, Any], events: Sequence[NewEvent] = ()) -> bool:
        record = self._vms.get(uid)
        if record is None:
            raise StatusConflict(f"VM {uid} no longer exists")
        changed = record.status is None or _encode(record.status) != _encode(status)
        self.transactions += changed or bool(events)
        if events:
            self.events.extend(events)
            self.event_writes.append(tuple(events))
        if not changed:
            return False
        self._version += 1
        self._vms[uid] = replace(record, status=json.loads(_encode(status)), resource_version=self._version)
        self.status_writes.append((uid, status))
        return True

    async def finalize(self, uid: str) -> None:
        record = self._vms.get(uid)
        if record is None or record.deleted_at is None:
            return
        del self._vms[uid]
        self.transactions += 1
        self.events.append(
            NewEvent(uid, record.project, record.name, "Deleted", "resources released; the object is removed")
        )

    # EventSink.
    async def record(self, *events: NewEvent) -> None:
        self.events.extend(events)
        if events:
            self.event_writes.append(events)
            self.transactions += 1

    # AllocationLedger.
    async def held_by(self, uid: str) -> tuple[list[PortRow], list[DiskRow]]:
        ports = [row for row in await self.ports() if row.uid == uid]
        ports.sort(key=lambda row: (row.protocol.value, row.guest_port))
        disks = sorted((row for row in self._disks.values() if row.uid == uid), key=lambda row: row.name)
        return ports, disks

    async def ports(self) -> list[PortRow]:
        rows = [PortRow(uid, protocol, guest, host) for (uid, protocol, guest), host in self._ports.items()]
        return sorted(rows, key=lambda row: row.host_port)

    async def reserve_port(self, uid: str, protocol: PortProtocol, guest_port: int, host_port: int) -> int:
        held = self._ports.get((uid, protocol, guest_port))
        if held is not None:
            return held
        if any(p is protocol and host == host_port for (_, p, _), host in self._ports.items()):
            raise PortTaken(f"host port {protocol.value}/{host_port} is held by another VM")
        self._ports[(uid, protocol, guest_port)] = host_port
        return host_port

    async def release_ports(self, uid: str, keys: list[tuple[PortProtocol, int]]) -> None:
        for protocol, guest_port in keys:
            self._ports.pop((uid, protocol, guest_port), None)

    async def disks(self) -> list[DiskRow]:
        return sorted(self._disks.values(), key=lambda row: (row.uid, row.name))

    async def retained_disks(self) -> list[DiskRow]:
        rows = [row for row in self._disks.values() if row.uid not in self._vms]
        return sorted(rows, key=lambda row: (row.owner or DiskOwner("", ""), row.name))

    async def record_disk(self, uid: str, disk: DiskRow) -> None:
        known = self._disks.get((uid, disk.name))
        if known is None:
            self._disks[(uid, disk.name)] = replace(disk, uid=uid)
        else:
            self._disks[(uid, disk.name)] = replace(
                known, reclaim_policy=disk.reclaim_policy, size_mib=disk.size_mib, base=disk.base
            )

    async def adopt_retained_disk(self, uid: str, owner: DiskOwner, name: str) -> DiskRow | None:
        found = next(
            (
                row
                for row in self._disks.values()
                if row.owner == owner
                and row.name == name
                and row.uid != uid
                and row.reclaim_policy is ReclaimPolicy.RETAIN
            ),
            None,
        )
        if found is None:
            return None
        if found.uid in self._vms:
            raise DiskHeld(
                f"disk {name!r} is retained by the deleted VM {owner.vm_name!r} ({found.uid}),"
                " which is still being torn down"
            )
        del self._disks[(found.uid, name)]
        adopted = replace(found, uid=uid)
        self._disks[(uid, name)] = adopted
        return adopted

    async def set_disk_size(self, uid: str, name: str, size_mib: int) -> None:
        row = self._disks.get((uid, name))
        if row is not None:
            self._disks[(uid, name)] = replace(row, size_mib=size_mib)

    async def forget_disk(self, uid: str, name: str) -> None:
        self._disks.pop((uid, name), None)
