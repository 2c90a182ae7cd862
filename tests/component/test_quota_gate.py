"""The quota gate over a real store: host ports against the port range and max_ports, the
default project disk cap, and what it reads (specs only when they changed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from api.instancetypes import revision_of
from api.snapshots import SNAPSHOT_KIND
from api.store import Database, StateStore, VMStore, fleet
from api.store.snapshots import SnapshotStore
from api.testing.tfstate import vm_state
from controller.admission import INVALID_SPEC, Quota, Quotas
from controller.clock import ManualClock
from controller.network import NetworkPolicy
from controller.quota_gate import FRESH_SECONDS, QuotaGate
from tests.component.conftest import FakeClock
from tests.component.test_store_states import write

RANGE = (20000, 20099)


def forwards(*host_ports: int | None) -> dict[str, Any]:
    return {
        "forwards": [
            {"guestPort": 1000 + index} | ({"hostPort": port} if port is not None else {})
            for index, port in enumerate(host_ports)
        ]
    }


async def uids(vms: VMStore) -> dict[str, tuple[str, int]]:
    return {record.name: (record.uid, record.generation) for record in await vms.list_records(project="lab")}


async def test_an_explicit_host_port_outside_the_range_is_an_invalid_spec(
    db: Database, states: StateStore, vms: VMStore
) -> None:
    manifests: dict[str, dict[str, Any]] = {
        "ops": {"network": forwards(8081)},
        "ok": {"network": forwards(20050, None)},
        "halted": {"runStrategy": "Halted", "network": forwards(30000)},
    }
    await write(states, vm_state(1, manifests))
    gate = QuotaGate(db, Quotas(), port_range=RANGE, clock=ManualClock())
    found = await uids(vms)
    ops = await gate.admission(*found["ops"])
    assert (ops.admitted, ops.reason) == (False, INVALID_SPEC)
    assert (
        ops.message
        == "spec.network.forwards[0].hostPort: 8081 is outside the port range 20000-20099 of this host"
    )
    assert (await gate.admission(*found["ok"])).admitted
    halted = await gate.admission(*found["halted"])
    assert halted.invalid_spec, "a halted VM's spec is checked too, before it is started"


async def test_a_network_the_host_does_not_allow_is_an_invalid_spec(
    db: Database, states: StateStore, vms: VMStore
) -> None:
    """guest_egress off (the default): mode passt is refused; on: it runs (docs/networking.md)."""
    await write(states, vm_state(1, {"out": {"network": {"mode": "passt"}}, "shut": {}}))
    found = await uids(vms)
    closed = QuotaGate(db, Quotas(), port_range=RANGE, clock=ManualClock())
    out = await closed.admission(*found["out"])
    assert (out.admitted, out.reason) == (False, INVALID_SPEC)
    assert "setting guest_egress is off" in out.message
    assert (await closed.admission(*found["shut"])).admitted
    allowed = NetworkPolicy(guest_egress=True)
    opened = QuotaGate(db, Quotas(), port_range=RANGE, clock=ManualClock(), network=allowed)
    assert (await opened.admission(*found["out"])).admitted


async def test_max_ports_and_the_default_disk_cap(
    db: Database, states: StateStore, vms: VMStore, clock: FakeClock
) -> None:
    first: dict[str, dict[str, Any]] = {"first": {"network": forwards(None, None)}}
    await write(states, vm_state(1, first))
    clock.advance(1)  # admission is oldest first
    more: dict[str, dict[str, Any]] = {
        "second": {"network": forwards(None)},
        "disky": {"disks": [{"name": "data", "size": "2Gi"}]},
    }
    await write(states, vm_state(2, {**first, **more}))
    quotas = Quotas(projects={"lab": Quota(max_ports=2)}, project_default=Quota(max_disk_gib=1))
    gate = QuotaGate(db, quotas, port_range=RANGE, clock=ManualClock())
    found = await uids(vms)
    assert (await gate.admission(*found["first"])).admitted
    second = await gate.admission(*found["second"])
    assert second.message == "project lab max_ports: 1 requested, 2 in use by older VMs, limit 2"
    disky = await gate.admission(*found["disky"])
    assert disky.message == (
        "project lab max_disk_gib: 2048 MiB requested, 0 MiB in use by older VMs and snapshots, limit 1 GiB"
    )


async def test_snapshots_count_against_the_disk_cap_when_a_vm_starts(
    db: Database, states: StateStore, vms: VMStore, clock: FakeClock
) -> None:
    """A ready snapshot holds its disks' size: a VM that would take the project past max_disk_gib
    does not start, and deleting the snapshot admits it (docs/snapshots.md)."""
    await write(states, vm_state(1, {"disky": {"disks": [{"name": "data", "size": "1Gi"}]}}))
    snapshots = SnapshotStore(db)
    spec = {"source": {"name": "other"}}
    await snapshots.request(SNAPSHOT_KIND, "lab", "kept", spec, by="ops", now=clock.now)
    ready = {"readyToUse": True, "sizeBytes": 1024 * 1024 * 1024}
    await snapshots.write_status(SNAPSHOT_KIND, "lab", "kept", revision_of(spec), ready, clock.now)
    quotas = Quotas(project_default=Quota(max_disk_gib=1))
    monotonic = ManualClock()
    gate = QuotaGate(db, quotas, port_range=RANGE, clock=monotonic, snapshots=snapshots)
    disky = await gate.admission(*(await uids(vms))["disky"])
    assert disky.message == (
        "project lab max_disk_gib: 1024 MiB requested, 1024 MiB in use by older VMs and snapshots,"
        " limit 1 GiB"
    )
    await snapshots.forget_requested(SNAPSHOT_KIND, "lab", "kept")
    assert await snapshots.forget_undeclared() == 1
    monotonic.advance(FRESH_SECONDS)
    assert (await gate.admission(*(await uids(vms))["disky"])).admitted, "the version moved"


async def test_specs_are_read_again_only_when_they_changed(
    db: Database, states: StateStore, vms: VMStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of reconciles costs one aggregate read per FRESH_SECONDS; an edit is seen at once."""
    assert FRESH_SECONDS == 1.0, "docs/controller.md: other VMs' changes reach a verdict within a second"
    await write(states, vm_state(1, {f"vm-{n}": dict() for n in range(20)}))
    fetched: list[int] = []
    real_specs_of = fleet.specs_of

    async def counting_specs_of(database: Database, wanted: list[str]) -> dict[str, tuple[int, str]]:
        fetched.append(len(wanted))
        return await real_specs_of(database, wanted)

    monkeypatch.setattr("controller.quota_gate.specs_of", counting_specs_of)
    clock = ManualClock()
    gate = QuotaGate(db, Quotas(server=Quota(max_ports=1)), port_range=RANGE, clock=clock)
    found = await uids(vms)
    for uid, generation in found.values():
        assert (await gate.admission(uid, generation)).admitted
    assert fetched == [20], "all parsed once, then kept"

    await write(
        states,
        vm_state(
            2,
            {
                **{f"vm-{n}": dict() for n in range(20)},
                "vm-3": dict(network=forwards(None, None)),
            },
        ),
    )
    uid, generation = (await uids(vms))["vm-3"]
    verdict = await gate.admission(uid, generation)
    assert verdict.message == "server max_ports: 2 requested, 0 in use by older VMs, limit 1"
    assert fetched == [20, 1], "only the edited spec is read again, at once (its own new generation)"

    clock.advance(FRESH_SECONDS)
    for uid, generation in found.values():
        await gate.admission(uid, generation)
    assert fetched == [20, 1]


async def test_a_flood_of_new_vms_asking_at_once_is_one_look(
    db: Database, states: StateStore, vms: VMStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large apply's reconciles all ask at once: one version read and one read of the new
    specs serve them all, not one each (hack/bench/converge counted 45 for 50 VMs)."""
    await write(states, vm_state(1, {f"vm-{n}": dict() for n in range(20)}))
    fetched: list[int] = []
    versions_read: list[tuple[object, ...]] = []
    real_specs_of, real_admission_version = fleet.specs_of, fleet.admission_version

    async def counting_specs_of(database: Database, wanted: list[str]) -> dict[str, tuple[int, str]]:
        fetched.append(len(wanted))
        return await real_specs_of(database, wanted)

    async def counting_admission_version(database: Database) -> tuple[object, ...]:
        versions_read.append(await real_admission_version(database))
        return versions_read[-1]

    monkeypatch.setattr("controller.quota_gate.specs_of", counting_specs_of)
    monkeypatch.setattr("controller.quota_gate.admission_version", counting_admission_version)
    gate = QuotaGate(db, Quotas(server=Quota(max_vms=15)), port_range=RANGE, clock=ManualClock())
    found = sorted((await uids(vms)).values())
    verdicts = await asyncio.gather(*(gate.admission(uid, generation) for uid, generation in found))
    assert (fetched, len(versions_read)) == ([20], 1)
    assert sum(verdict.admitted for verdict in verdicts) == 15, "the same verdicts as one by one"
