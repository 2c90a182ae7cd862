"""What the controller reads from and writes to the store, as Protocols.

The controller depends on these, never on a store implementation: the SQL store implements
them on either engine of the Database seam, SQLite or PostgreSQL (api/store/status_writer.py
VMStatusWriter, allocations.py Allocations, events.py EventLog), and so does the in-memory fake
beside them (api/store/memory.py); all three pass the same contract tests
(tests/component/test_store_contract.py). Leases (several controllers) will join later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from api.store.records import DiskOwner, DiskRow, NewEvent, PortRow, VMRecord
from api.types import Protocol as PortProtocol


class VMObjects(Protocol):
    """The VM objects, read by the controller."""

    async def get(self, uid: str) -> VMRecord | None:
        """The object `uid`, or None when there is none (never created, or finalized)."""
        ...

    async def versions(self) -> dict[str, int]:
        """Every object's uid and resourceVersion: the list a resync walks."""
        ...


class StatusStore(VMObjects, Protocol):
    """The objects, and the two writes only the controller makes."""

    async def write_status(self, uid: str, status: dict[str, Any], events: Sequence[NewEvent] = ()) -> bool:
        """Store `status` unless it is unchanged, and `events` (changed or not) in the same
        transaction, in order: a pass's events exist exactly when its status does. Returns
        whether the status was written.

        :raise StatusConflict: the object no longer exists (nothing is stored, events neither).
        """
        ...

    async def finalize(self, uid: str) -> None:
        """Remove a deleting object (with a `Deleted` event). Idempotent; an object that is not
        being deleted is left alone."""
        ...


class AllocationLedger(Protocol):
    """Host ports and disk files held by VMs, recorded before they are used."""

    async def held_by(self, uid: str) -> tuple[list[PortRow], list[DiskRow]]: ...

    async def ports(self) -> list[PortRow]: ...

    async def reserve_port(self, uid: str, protocol: PortProtocol, guest_port: int, host_port: int) -> int:
        """Record `uid`'s forward of `guest_port` on `host_port`; idempotent per forward.
        Returns the host port that forward holds.

        :raise PortTaken: another VM holds `host_port`.
        """
        ...

    async def release_ports(self, uid: str, keys: list[tuple[PortProtocol, int]]) -> None: ...

    async def disks(self) -> list[DiskRow]: ...

    async def retained_disks(self) -> list[DiskRow]:
        """Disks whose VM object is gone."""
        ...

    async def record_disk(self, uid: str, disk: DiskRow) -> None:
        """Record a disk (again: its policy, size and base are updated)."""
        ...

    async def adopt_retained_disk(self, uid: str, owner: DiskOwner, name: str) -> DiskRow | None:
        """Give `uid` the retained disk `name` of a gone VM of the same owner, if there is one.

        :raise DiskHeld: that disk's VM is still being deleted.
        """
        ...

    async def set_disk_size(self, uid: str, name: str, size_mib: int) -> None: ...

    async def forget_disk(self, uid: str, name: str) -> None: ...


class EventSink(Protocol):
    """Where events with no status to ride on go (the API's: Created, ForceUnlocked...); the
    controller's go with `StatusStore.write_status`. A failure is the caller's to log and drop."""

    async def record(self, *events: NewEvent) -> None: ...
