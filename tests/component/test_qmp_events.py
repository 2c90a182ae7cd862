"""QMP events through controller/qemu/monitor.py on a real QEMU (`-machine none`): the watched
ones come in order, and nothing heard is kept after it was read (qemu.qmp's listeners keep a
history of every event for the connection's life). e2e mark: real QEMU."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.qemu.argv import RuntimePaths
from controller.qemu.monitor import WATCHED_EVENTS, Monitor
from controller.qemu.runtime import Runtime
from tests.component.test_hypervisor_contract import UID, WAIT_SECONDS, Subject

pytestmark = pytest.mark.e2e


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    """A QEMU spawned with -S, let go by its runtime, and a Monitor of our own on its socket."""
    subject = Subject("qemu", RuntimePaths(tmp_path / "run" / UID))
    await subject.start()
    try:
        await subject.spawn()
        assert isinstance(subject.hv, Runtime)
        await subject.hv.detach(UID)  # a QMP socket serves one client at a time
        connected = await Monitor.connect(Path(subject.paths.qmp_socket), name=UID, within=WAIT_SECONDS)
        try:
            yield connected
        finally:
            await connected.close()
    finally:
        await subject.close()


async def test_watched_events_come_in_order_and_none_is_kept(monitor: Monitor) -> None:
    events = monitor.events()
    for command, expected in (("cont", "RESUME"), ("stop", "STOP"), ("cont", "RESUME")):
        await monitor.execute(command)
        async with asyncio.timeout(WAIT_SECONDS):
            event = await anext(events)
        assert event["event"] == expected
    assert {"RESUME", "STOP"} <= set(WATCHED_EVENTS)
    client = monitor._client  # what qemu.qmp would have kept is the point
    assert client.watched.empty()
    assert client.events.empty()
    assert client.events.history == ()
