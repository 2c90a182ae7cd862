"""Instance types through the whole reconcile pass, on the fakes (docs/instancetypes.md): the
type sizes the QEMU, a changed type restarts nothing and marks the VM outdated, a rollout takes
the new revision and restarts it gracefully, and a rollout that changes nothing restarts nothing."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from api.instancetypes import Found, Ref
from api.types import Phase, RunOverride
from tests.unit.reconciler_world import KERNEL, World

SMALL = Ref("QemuInstanceType", "small")
TYPED = {
    "instanceType": {"name": "small", "kind": "QemuInstanceType"},
    "accel": "tcg",
    "boot": {"kernel": KERNEL},
}


@dataclass
class Types:
    """The instance types the catalog holds, by reference."""

    current: dict[Ref, Found] = field(default_factory=dict)

    async def lookup(self, project: str, ref: Ref) -> Found | None:
        return self.current.get(ref)


@pytest.fixture
def world(tmp_path: Path) -> tuple[World, Types]:
    world = World(tmp_path)
    types = Types({SMALL: Found({"cpus": 1, "memory": 128})})
    world.reconciler._instance_types = types  # the Reconciler's Protocol, behind its constructor
    return world, types


def memory_of(world: World, uid: str) -> str:
    argv = world.hv.processes[uid].argv
    return argv[argv.index("-m") + 1]


def rollout(world: World, uid: str) -> None:
    now = world.clock.now()
    request = RunOverride(requested_by="alice", updated_at=now, rollout_requested_at=now)
    world.store.put(replace(world.record(uid), override=request.model_dump(mode="json", by_alias=True)))


def outdated(world: World, uid: str) -> str:
    [condition] = [c for c in world.status(uid).conditions if c.type == "InstanceTypeOutdated"]
    return condition.status.value


async def test_a_type_change_waits_for_a_rollout_that_restarts_gracefully(world: tuple[World, Types]) -> None:
    vms, types = world
    uid = vms.add("web", TYPED)
    await vms.settle(uid)
    pid = vms.hv.pid_of(uid)
    assert (vms.status(uid).phase, memory_of(vms, uid), outdated(vms, uid)) == (
        Phase.RUNNING,
        "128M",
        "False",
    )

    types.current[SMALL] = Found({"cpus": 1, "memory": 256})
    await vms.settle(uid)
    assert (vms.hv.pid_of(uid), memory_of(vms, uid), outdated(vms, uid)) == (pid, "128M", "True")
    assert "InstanceTypeOutdated" in vms.events(uid)

    vms.clock.advance(1)
    rollout(vms, uid)
    await vms.settle(uid)  # the graceful stop: the power button, then the exit
    assert (uid, "system_powerdown") in vms.hv.commands
    await vms.settle(uid)
    status = vms.status(uid)
    assert status.phase is Phase.RUNNING
    assert vms.hv.pid_of(uid) != pid
    assert (memory_of(vms, uid), outdated(vms, uid)) == ("256M", "False")
    assert status.instance_type is not None
    assert status.instance_type.spec == {"cpus": 1, "memory": 256}
    assert vms.record(uid).generation == 1, "the spec never changed"


async def test_a_rollout_to_the_same_size_restarts_nothing(world: tuple[World, Types]) -> None:
    vms, _ = world
    uid = vms.add("web", TYPED)
    await vms.settle(uid)
    pid = vms.hv.pid_of(uid)
    taken = vms.status(uid).instance_type
    vms.clock.advance(1)
    rollout(vms, uid)
    await vms.settle(uid)
    assert vms.hv.pid_of(uid) == pid
    assert vms.status(uid).instance_type != taken, "the revision is taken again, at the rollout's time"
    assert (uid, "system_powerdown") not in vms.hv.commands


async def test_a_vm_that_sets_what_its_type_sets_is_invalid_and_keeps_nothing(
    world: tuple[World, Types],
) -> None:
    vms, _ = world
    uid = vms.add("web", {**TYPED, "cpus": 2})
    await vms.settle(uid)
    status = vms.status(uid)
    assert status.phase is Phase.INVALID
    [valid] = [c for c in status.conditions if c.type == "Valid"]
    assert valid.message.startswith("spec.cpus: set by QemuInstanceType 'small'")
    assert vms.hv.pid_of(uid) is None
