"""Reads never see a write transaction that has not committed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from api.store import Database, StateStore
from api.testing.tfstate import vm_state
from tests.component.test_store_states import write


async def test_read_during_an_open_write_sees_the_committed_state(db: Database, states: StateStore) -> None:
    """A GET racing a write that later rolls back is served the old state, never the new one."""
    await write(states, vm_state(1, {}))
    entered, release = asyncio.Event(), asyncio.Event()

    async def failing_write() -> None:
        async with db.write() as conn:
            await conn.execute("UPDATE projects SET current_version = NULL WHERE name = 'lab'")
            entered.set()
            await release.wait()
            raise RuntimeError("rolled back")

    task = asyncio.create_task(failing_write())
    await entered.wait()
    stored = await states.read("lab")
    release.set()
    with pytest.raises(RuntimeError):
        await task
    assert stored is not None
    assert stored.serial == 1


async def test_interleaved_reads_see_every_committed_write(db: Database, states: StateStore) -> None:
    """Reads racing on the shared reader never return a state older than an acknowledged write."""
    stale: list[tuple[int, int | None]] = []

    async def reader_noise() -> None:
        for _ in range(200):
            await states.list_projects()

    async def writer_then_reader() -> None:
        for serial in range(1, 60):
            await write(states, vm_state(serial, {}))
            stored = await states.read("lab")
            if stored is None or stored.serial != serial:
                stale.append((serial, stored.serial if stored else None))

    await asyncio.gather(writer_then_reader(), *(reader_noise() for _ in range(4)))
    assert stale == []


async def test_repeated_port_reservation_is_idempotent(db: Database) -> None:
    """Reserving a forward's port again returns the held port instead of reporting a clash."""
    from api.store.allocations import Allocations, PortTaken
    from api.types import Protocol

    allocations = Allocations(db)
    assert await allocations.reserve_port("vm-a", Protocol.TCP, 80, 20000) == 20000
    assert await allocations.reserve_port("vm-a", Protocol.TCP, 80, 20001) == 20000
    with pytest.raises(PortTaken):
        await allocations.reserve_port("vm-b", Protocol.TCP, 80, 20000)


async def test_held_by_lists_only_that_vms_ports_and_disks(db: Database) -> None:
    from api.store.allocations import Allocations, DiskRow, PortRow
    from api.types import Protocol, ReclaimPolicy

    allocations = Allocations(db)
    await allocations.reserve_port("vm-a", Protocol.UDP, 53, 20002)
    await allocations.reserve_port("vm-a", Protocol.TCP, 80, 20001)
    await allocations.reserve_port("vm-b", Protocol.TCP, 80, 20003)
    disk_a = DiskRow("vm-a", "root", "/d/vm-a/root.qcow2", ReclaimPolicy.DELETE, 1024)
    await allocations.record_disk("vm-a", disk_a)
    await allocations.record_disk("vm-b", DiskRow("vm-b", "root", "/d/vm-b/root.qcow2", ReclaimPolicy.RETAIN))

    ports, disks = await allocations.held_by("vm-a")

    assert ports == [PortRow("vm-a", Protocol.TCP, 80, 20001), PortRow("vm-a", Protocol.UDP, 53, 20002)]
    assert disks == [disk_a]
    assert await allocations.held_by("vm-c") == ([], [])


async def test_a_write_cancelled_while_waiting_for_the_lock_leaves_the_store_writable(
    db: Database, hold_write_lock: Callable[[], Callable[[], None]]
) -> None:
    """aiosqlite finishes a cancelled BEGIN on its thread later; the store must still end it.
    (On PostgreSQL the cancelled wait for the advisory lock must not leave it held.)"""
    release = hold_write_lock()  # another process holds the store's write lock

    async def write_something() -> None:
        async with db.write() as conn:
            await conn.execute("UPDATE resource_versions SET value = value + 1")

    waiting = asyncio.create_task(write_something())
    await asyncio.sleep(0.1)
    waiting.cancel()
    await asyncio.sleep(0.1)
    release()  # the lock frees: the cancelled BEGIN now succeeds on aiosqlite's thread
    with pytest.raises(asyncio.CancelledError):
        await waiting

    await write_something()
    await db.probe_writable()
    assert (await db.read("SELECT value FROM resource_versions"))[0][0] == 1
