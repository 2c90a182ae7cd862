"""A VM moved to another host holds its ports and disks there while its old host's rows stay,
and shows none of its old host's status (docs/multi-host.md, "A lost host"), on SQLite and
PostgreSQL.

The bug this pins: the ledger's keys did not name the host, so on the new host the port
reservation was a silent no-op answering with the old host's port, and the disk record kept the
old host's row; the new host saw nothing held, asked again at every reconcile, and the VM stayed
Pending for good (tests/e2e/test_host_failure.py, before the fix).
"""

from __future__ import annotations

import asyncio
import json

from api.hosts import Resources
from api.store import Database
from api.store.allocations import Allocations
from api.store.hosts import Hosts, Registration
from api.store.records import DiskOwner, DiskRow, render_status
from api.store.status_writer import VMStatusWriter
from api.types import Phase, Protocol, ReclaimPolicy
from tests.component.test_hosts_store import add_vm

UID = "vm-moved"


def disk(host: str) -> DiskRow:
    path = f"/{host}/disks/{UID}/scratch.qcow2"
    return DiskRow(UID, "scratch", path, ReclaimPolicy.DELETE, 8, None, DiskOwner("p", UID))


async def test_the_new_host_holds_its_own_port_and_disk_beside_the_old_hosts_rows(db: Database) -> None:
    await add_vm(db, UID, host="host-a")
    old, new = Allocations(db, host="host-c"), Allocations(db, host="host-a")
    assert await old.reserve_port(UID, Protocol.TCP, 80, 41001) == 41001
    await old.record_disk(UID, disk("host-c"))

    assert await new.reserve_port(UID, Protocol.TCP, 80, 41500) == 41500
    assert await new.reserve_port(UID, Protocol.TCP, 80, 41600) == 41500, "a retry keeps its port"
    await new.record_disk(UID, disk("host-a"))
    ports, disks = await new.held_by(UID)
    assert [(port.guest_port, port.host_port) for port in ports] == [(80, 41500)]
    assert [row.path for row in disks] == [f"/host-a/disks/{UID}/scratch.qcow2"]

    # The old host's rows are its own, released by its controller when it returns.
    ports, disks = await old.held_by(UID)
    assert [(port.guest_port, port.host_port) for port in ports] == [(80, 41001)]
    assert [row.path for row in disks] == [f"/host-c/disks/{UID}/scratch.qcow2"]
    await old.release_ports(UID, [(Protocol.TCP, 80)])
    await old.forget_disk(UID, "scratch")
    assert await old.held_by(UID) == ([], [])
    ports, disks = await new.held_by(UID)
    assert (len(ports), len(disks)) == (1, 1)


async def test_two_hosts_reserving_for_one_vm_at_once_each_get_their_own(db: Database) -> None:
    """A drained VM may start on its new host before its old one has let go."""
    await add_vm(db, UID, host="host-b")
    hosts = [Allocations(db, host=name) for name in ("host-a", "host-b")]
    got = await asyncio.gather(*(h.reserve_port(UID, Protocol.TCP, 80, 41010) for h in hosts))
    assert got == [41010, 41010]  # the same number on two hosts is two ports
    for allocations in hosts:
        ports, _ = await allocations.held_by(UID)
        assert [port.host_port for port in ports] == [41010]


async def test_a_rescheduled_vm_shows_no_status_of_its_lost_host(db: Database) -> None:
    """The lost host's Running, pid and ports are gone with it: until the new host writes its own
    status the VM reads Pending there, not Running with a port nothing listens on."""
    hosts = Hosts(db)
    for name in ("host-a", "host-c"):
        await hosts.register(Registration(name, {}, Resources(2, 4096, 10), lease_seconds=15.0))
    stale = {
        "phase": "Running",
        "pid": 4242,
        "ports": [{"protocol": "TCP", "guestPort": 80, "hostPort": 41001}],
    }
    await add_vm(db, UID, host="host-c", status=json.dumps(stale))
    assert await hosts.reschedule({UID: ("host-c", "host-a")}, {"host-c": "host host-c lost"}) == [UID]
    record = await VMStatusWriter(db, host="host-a").get(UID)
    assert record is not None
    status = render_status(record)
    assert (status.host, status.phase, status.pid, status.ports) == ("host-a", Phase.PENDING, None, ())
