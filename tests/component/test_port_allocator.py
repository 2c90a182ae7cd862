"""The port allocator keeps its range a hard limit, whatever the plan asks."""

from __future__ import annotations

import pytest

from api.store import Database
from api.store.allocations import Allocations
from api.types import Protocol
from controller.resources.ports import PortAllocator, PortUnavailable
from tests.e2e.harness import free_loopback_port

UID = "0b7d4a43-2c55-4a8e-9a57-3f0d7e6e2a10"


async def test_an_explicit_port_outside_the_range_is_never_reserved(db: Database) -> None:
    allocations = Allocations(db)
    free = free_loopback_port()
    ports = PortAllocator(allocations, first=free, last=free)
    with pytest.raises(PortUnavailable, match=f"hostPort 8081 is outside the port range {free}-{free}"):
        await ports.allocate(UID, (((Protocol.TCP, 80), 8081),))
    assert await allocations.ports() == []
    await ports.allocate(UID, (((Protocol.TCP, 80), free),))
    assert [row.host_port for row in await allocations.ports()] == [free]
