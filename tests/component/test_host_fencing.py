"""Fencing on both engines: a stale epoch refuses a host's writes, the scheduler reschedules a
lost host's data-less VMs (and fences the host), `drain --force`, and a controller's own fence
(docs/multi-host.md, "Fencing")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from api.hosts import Resources
from api.server.keys import DATABASE
from api.store import Database
from api.store.allocations import Allocations
from api.store.errors import StoreUnavailable
from api.store.events import EventLog
from api.store.fencing import StaleEpoch
from api.store.hosts import Hosts, Registration
from api.store.postgres_renewal import RenewalConnection
from api.store.status_writer import VMStatusWriter
from api.types import Protocol
from controller.fencing import fence_deadline
from controller.host_agent import RENEWALS_PER_LEASE, HostAgent, HostMetrics, Scheduler
from controller.self_fence import KILL_WAIT_SECONDS
from controller.settings import ControllerSettings
from tests.component.conftest import AUTH, FakeClock
from tests.component.test_hosts_store import add_vm

RETAINED = {"memory": 256, "cpus": 1, "disks": [{"name": "data", "size": "1Gi", "reclaimPolicy": "Retain"}]}
WAIT_SECONDS = 10.0


class FakeQemus:
    """HostQemus without processes: which uids run, and which a fence killed."""

    def __init__(self, running: Iterable[str]) -> None:
        self.alive = set(running)
        self.killed: list[str] = []
        self.fenced = asyncio.Event()

    def running(self) -> list[str]:
        return sorted(self.alive)

    def kill(self, uids: Iterable[str]) -> list[str]:
        killed = [uid for uid in uids if uid in self.alive]
        self.alive -= set(killed)
        self.killed += killed
        if killed:
            self.fenced.set()
        return killed

    async def wait_gone(self, uids: Iterable[str]) -> list[str]:
        return [uid for uid in uids if uid in self.alive]


def agent(
    tmp_path: Path, db: Database, qemus: FakeQemus, *, lease: float = 15.0, woken: list[str] | None = None
) -> HostAgent:
    settings = ControllerSettings(data_dir=tmp_path, host_name="a", host_lease_seconds=lease)
    wake = (woken if woken is not None else []).append
    return HostAgent(settings, db, HostMetrics(CollectorRegistry()), qemus=qemus, wake=wake)  # type: ignore[arg-type]


async def other_host(db: Database, name: str = "b") -> Hosts:
    hosts = Hosts(db)
    await hosts.register(Registration(name, {}, Resources(2, 4096, 10), lease_seconds=15.0))
    return hosts


async def test_a_stale_epoch_refuses_every_host_side_write(db: Database, tmp_path: Path) -> None:
    host = agent(tmp_path, db, FakeQemus([]))
    await host.register()
    await add_vm(db, "vm1", host="a")
    objects = VMStatusWriter(host.store, host="a")
    assert await objects.write_status("vm1", {"phase": "Running"})
    # Another registration under this name (or a move of its VMs) takes the next epoch.
    await Hosts(db).register(Registration("a", {}, Resources(2, 4096, 10), lease_seconds=15.0))
    with pytest.raises(StaleEpoch, match="host a is at epoch 2, this controller registered at epoch 1"):
        await objects.write_status("vm1", {"phase": "Stopped"})
    with pytest.raises(StaleEpoch):
        await Allocations(host.store, host="a").reserve_port("vm1", Protocol.TCP, 22, 20000)
    with pytest.raises(StaleEpoch):
        await EventLog(host.store).prune()
    assert not host.may_spawn(), "a stale controller starts no QEMU"
    assert (await objects.get("vm1")) is not None
    assert (await objects.get("vm1")).status == {"phase": "Running"}  # type: ignore[union-attr]
    assert await Allocations(db, host="a").ports() == []


async def test_a_lost_hosts_data_less_vms_are_rescheduled_and_the_host_fenced(
    db: Database, clock: FakeClock
) -> None:
    hosts = Hosts(db)
    await hosts.register(Registration("a", {}, Resources(2, 4096, 10), lease_seconds=0.2))
    await add_vm(db, "plain", host="a")
    await add_vm(db, "keeper", host="a", spec=RETAINED)
    scheduler = Scheduler(db, holder="b", lease_seconds=15.0, lost_grace=timedelta(seconds=0.2))
    if db.dialect == "sqlite":
        clock.advance(0.5)
    else:
        await asyncio.sleep(0.5)
    await other_host(db)
    assert await scheduler.schedule_once() == 1
    assert {vm.uid: vm.host for vm in await hosts.placed()} == {"plain": "b", "keeper": "a"}
    events = EventLog(db)
    moved = [(e.reason, e.message) for e in await events.list(uid="plain")]
    assert [reason for reason, _ in moved] == ["HostLost", "Rescheduled"]
    assert moved[1][1].startswith("from host a to host b: host a lost: no lease renewal since ")
    assert [e.reason for e in await events.list(uid="keeper")] == ["HostLost"]
    epochs = {host.name: host.epoch for host in await hosts.all()}
    assert epochs == {"a": 2, "b": 1}, "moving VMs away fences their host"
    assert await scheduler.schedule_once() == 0, "the retained-disk VM waits for its host"


async def test_drain_force_moves_retained_vms_too_and_fences_the_host(
    client: TestClient[Any, Any],
) -> None:
    db = client.app[DATABASE]
    hosts = await other_host(db, "a")
    await add_vm(db, "keeper", host="a", spec=RETAINED)
    plain = await client.post("/api/v1/hosts/a/drain", headers=AUTH)
    assert (await plain.json())["kept"] == ["keeper"]
    bad = await client.post("/api/v1/hosts/a/drain?force=yes", headers=AUTH)
    assert (bad.status, (await bad.json())["kind"]) == (400, "Status")
    forced = await client.post("/api/v1/hosts/a/drain?force=true", headers=AUTH)
    body = await forced.json()
    assert (forced.status, body["moved"], body["kept"], body["host"]["epoch"]) == (200, ["keeper"], [], 2)
    assert [vm.host for vm in await hosts.placed()] == [None]


async def test_a_controller_whose_vms_moved_away_kills_them_and_registers_again(
    db: Database, tmp_path: Path
) -> None:
    qemus = FakeQemus(["stays", "moved"])
    woken: list[str] = []
    host = agent(tmp_path, db, qemus, woken=woken)
    registered = await host.register()
    await add_vm(db, "stays", host="a")
    await add_vm(db, "moved", host="a")
    hosts = await other_host(db)
    assert await hosts.reschedule({"moved": ("a", "b")}, {"a": "host a lost"}) == ["moved"]
    assert await host.renew(within=WAIT_SECONDS)
    assert qemus.killed == ["moved"]
    assert host.store.epoch == registered.epoch + 2  # the move's, then its own registration's
    assert host.may_spawn()
    assert set(woken) >= {"stays", "moved"}
    (fenced,) = [e for e in await EventLog(db).list(uid="moved") if e.reason == "Fenced"]
    assert fenced.message == "QEMU on host a killed: the VM was moved away from host a"
    await host.close()


async def test_a_controller_that_cannot_renew_kills_its_qemus_before_its_lease_ends(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = 1.5
    qemus = FakeQemus(["vm1"])
    host = agent(tmp_path, db, qemus, lease=lease)
    sent = time.monotonic()
    await host.register()
    await add_vm(db, "vm1", host="a")

    async def unreachable(*_args: object) -> bool:
        raise StoreUnavailable("PostgreSQL is away")

    monkeypatch.setattr(Hosts, "renew", unreachable)
    monkeypatch.setattr(RenewalConnection, "renew", unreachable)  # PostgreSQL's own connection
    fence = asyncio.create_task(host.fence_forever())
    if db.dialect == "sqlite":
        # One machine holds the store: no other host can take the VMs, nothing is fenced.
        await asyncio.sleep(lease)
        assert (qemus.killed, host.may_spawn()) == ([], True)
        fence.cancel()
        return
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            await qemus.fenced.wait()
        killed_after = time.monotonic() - sent
        assert fence_deadline(0.0, lease) <= killed_after < lease, killed_after
        assert not host.may_spawn()
        monkeypatch.undo()
        assert await host.renew(within=WAIT_SECONDS)
        assert host.may_spawn()
        assert [e.reason for e in await EventLog(db).list(uid="vm1")] == ["Fenced"]
    finally:
        fence.cancel()
        await host.close()


async def test_a_controller_waking_from_a_freeze_kills_only_what_moved_before_it_starts_anything(
    db: Database, tmp_path: Path
) -> None:
    """Its loops stand still past its fence deadline (a freeze), a VM of its is moved meanwhile;
    on waking nothing may start until its renewal found the epoch stale and the moved VM's QEMU
    is killed, within one renewal period plus the kill wait (docs/multi-host.md)."""
    lease = 1.5
    qemus = FakeQemus(["stays", "moved"])
    host = agent(tmp_path, db, qemus, lease=lease)
    await host.register()
    await add_vm(db, "stays", host="a")
    await add_vm(db, "moved", host="a")
    hosts = await other_host(db)
    await asyncio.sleep(lease)  # frozen: no renewal, no fence
    assert await hosts.reschedule({"moved": ("a", "b")}, {"a": "host a lost"}) == ["moved"]
    woke = time.monotonic()
    if db.dialect != "sqlite":
        assert not host.may_spawn(), "past its fence deadline, a woken controller starts nothing"
    loops = [asyncio.create_task(host.renew_forever()), asyncio.create_task(host.fence_forever())]
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            await qemus.fenced.wait()
        for _ in range(100):
            if host.may_spawn():
                break
            await asyncio.sleep(0.01)
        assert time.monotonic() - woke <= lease / RENEWALS_PER_LEASE + KILL_WAIT_SECONDS
        assert (qemus.killed, qemus.running()) == (["moved"], ["stays"])
    finally:
        for loop in loops:
            loop.cancel()
