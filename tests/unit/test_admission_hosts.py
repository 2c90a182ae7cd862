"""Admission of host ports and disk space: the port range, max_ports, the default project disk
cap, the free-space reserve and disks larger than the filesystem."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from api.infra.settings import load_settings
from api.types import QemuVMStatus, ReclaimPolicy
from controller.actions import AllocatePorts, CreateDisk, ReleasePorts
from controller.admission import (
    INVALID_SPEC,
    Admission,
    Quota,
    Quotas,
    admit,
    host_port_problem,
    parse_quota,
)
from controller.model import DiskRecord, Memory, Observed, Storage
from controller.plan import Intent, plan
from controller.resources.disks import filesystem_space
from controller.settings import DEFAULT_PROJECT_MAX_DISK_GIB, ControllerSettings
from controller.status import compute_status
from tests.unit.test_admission import claim
from tests.unit.test_plan import (
    CONTEXT,
    HTTP,
    NOW,
    ROOT_PATH,
    desired,
    digest_for,
    observed,
    process,
    ready,
    spec,
)

OUT_OF_RANGE = "spec.network.forwards[0].hostPort: 8081 is outside the port range 20000-29999 of this host"
RANGE = (20000, 29999)
GIB = 1024


def test_a_host_port_outside_the_range_names_the_field() -> None:
    forwards = [{"guestPort": 22, "hostPort": 20022}, {"guestPort": 80, "hostPort": 8081}]
    problem = host_port_problem(spec(network={"forwards": forwards}), RANGE)
    assert problem == OUT_OF_RANGE.replace("forwards[0]", "forwards[1]")
    assert host_port_problem(spec(network={"forwards": forwards[:1]}), RANGE) == ""
    edges = [{"guestPort": 1, "hostPort": 20000}, {"guestPort": 2, "hostPort": 29999}]
    assert host_port_problem(spec(network={"forwards": edges}), RANGE) == ""
    assert host_port_problem(spec(network={"forwards": [{"guestPort": 1, "hostPort": 30000}]}), RANGE)
    assert host_port_problem(spec(), RANGE) == "", "an allocated port is always in the range"


def test_max_ports_counts_forwards_per_server_and_project() -> None:
    claims = [replace(claim("a", age_rank=0), ports=2), replace(claim("b", age_rank=1), ports=2)]
    verdicts = admit(claims, Quotas(server=Quota(max_ports=3)))
    assert (verdicts["a"].admitted, verdicts["b"].admitted) == (True, False)
    assert verdicts["b"].message == "server max_ports: 2 requested, 2 in use by older VMs, limit 3"
    verdicts = admit(claims, Quotas(projects={"lab": Quota(max_ports=2)}))
    assert verdicts["b"].message == "project lab max_ports: 2 requested, 2 in use by older VMs, limit 2"


def test_the_default_project_quota_applies_under_a_project_s_own_limits() -> None:
    quotas = Quotas(
        projects={"big": Quota(max_disk_gib=4096), "few": Quota(max_vms=1)},
        project_default=Quota(max_disk_gib=1),
    )
    assert quotas.project("big") == Quota(max_disk_gib=4096)
    assert quotas.project("few") == Quota(max_vms=1, max_disk_gib=1)
    assert quotas.project("other") == Quota(max_disk_gib=1)
    claims = [claim("a", age_rank=0, disk=GIB), claim("b", age_rank=1, disk=1)]
    verdicts = admit(claims, quotas)
    assert (verdicts["a"].admitted, verdicts["b"].admitted) == (True, False)
    assert (
        verdicts["b"].message
        == "project lab max_disk_gib: 1 MiB requested, 1024 MiB in use by older VMs and snapshots,"
        " limit 1 GiB"
    )


def test_a_vm_of_16_disks_of_64_tib_is_over_the_default_project_cap() -> None:
    """The audit's VM: refused by default, with the numbers."""
    settings = load_settings(ControllerSettings, flags={}, env={})
    huge = claim("huge", age_rank=0, disk=16 * 64 * 1024 * GIB)
    verdict = admit([huge], settings.quotas)["huge"]
    assert not verdict.admitted
    assert verdict.message == (
        f"project lab max_disk_gib: {16 * 64 * 1024 * GIB} MiB requested, 0 MiB in use by older VMs"
        f" and snapshots, limit {DEFAULT_PROJECT_MAX_DISK_GIB} GiB"
    )


def test_admission_settings_defaults() -> None:
    settings = load_settings(ControllerSettings, flags={}, env={})
    assert settings.max_ports is None
    assert settings.default_project_quotas == "max_disk_gib=1024"
    assert DEFAULT_PROJECT_MAX_DISK_GIB == 1024
    assert settings.storage_reserve_mib == 1024
    assert settings.quotas.project_default == Quota(max_disk_gib=1024)
    lifted = load_settings(ControllerSettings, flags={"default_project_quotas": "", "max_ports": "5"}, env={})
    assert lifted.quotas.project("lab").is_unlimited
    assert lifted.quotas.server == Quota(max_ports=5)


def test_a_bad_default_project_quota_says_why() -> None:
    with pytest.raises(ValueError, match="default_project_quotas 'max_disk=1'"):
        parse_quota("max_disk=1", what="default_project_quotas")


INVALID = Admission(False, OUT_OF_RANGE, INVALID_SPEC)


def test_a_host_port_outside_the_range_takes_no_port_and_shows_valid_false() -> None:
    vm = replace(desired(network={"forwards": [{"guestPort": 80, "hostPort": 8081}]}), admission=INVALID)
    fresh = plan(vm, observed(), Memory(), CONTEXT, now=NOW)
    assert fresh.intent is Intent.INVALID
    assert fresh.actions == ()
    held = plan(vm, observed(**ready()), Memory(), CONTEXT, now=NOW)
    assert held.actions == (ReleasePorts((HTTP,)),)
    status = compute_status(vm, observed(), fresh, QemuVMStatus(), accel=None, error=None, now=NOW)
    conditions = {c.type: c for c in status.conditions}
    assert (conditions["Valid"].status.value, conditions["Valid"].reason) == ("False", "InvalidSpec")
    assert conditions["Valid"].message == OUT_OF_RANGE
    assert conditions["Synced"].status.value == "False"
    assert status.phase.value == "Invalid"


def test_a_running_vm_whose_port_became_invalid_keeps_running_untouched() -> None:
    vm = desired()
    running = observed(**ready(process=process(digest_for(vm))))
    result = plan(replace(vm, admission=INVALID), running, Memory(), CONTEXT, now=NOW)
    assert (result.intent, result.actions) == (Intent.INVALID, ())


@pytest.mark.parametrize("admission", [Admission(False, "server max_ports: limit 1"), INVALID])
def test_a_vm_that_may_not_start_gives_its_ports_back(admission: Admission) -> None:
    result = plan(replace(desired(), admission=admission), observed(**ready()), Memory(), CONTEXT, now=NOW)
    assert ReleasePorts((HTTP,)) in result.actions
    assert not any(isinstance(action, AllocatePorts) for action in result.actions)


SIZED = [{"name": "root", "image": "base.raw"}, {"name": "data", "size": "10Gi"}]
NEW_DATA = 10 * GIB
RESERVE = replace(CONTEXT, storage_reserve_mib=1024)


def with_storage(available: int, total: int = 100 * GIB, **fields: object) -> Observed:
    return observed(**ready(storage=Storage(total_mib=total, available_mib=available), **fields))


def test_new_disks_wait_for_free_space_above_the_reserve() -> None:
    vm = desired(disks=SIZED)
    short = plan(vm, with_storage(NEW_DATA + 1023), Memory(), RESERVE, now=NOW)
    assert short.intent is Intent.INSUFFICIENT_STORAGE
    assert short.detail == (
        f"its new disks need {NEW_DATA} MiB; the disks filesystem has {NEW_DATA + 1023} MiB free"
        " and keeps 1024 MiB in reserve"
    )
    assert short.actions == (ReleasePorts((HTTP,)),), "it may not start: its ports go back"
    assert short.requeue_after is not None
    status = compute_status(vm, with_storage(0), short, QemuVMStatus(), accel=None, error=None, now=NOW)
    admitted = next(c for c in status.conditions if c.type == "Admitted")
    assert (admitted.status.value, admitted.reason, admitted.message) == (
        "False",
        "InsufficientStorage",
        short.detail,
    )
    enough = plan(vm, with_storage(NEW_DATA + 1024), Memory(), RESERVE, now=NOW)
    assert enough.intent is Intent.PREPARING
    assert any(isinstance(action, CreateDisk) for action in enough.actions)


def test_disks_that_exist_are_not_claimed_again_but_growth_is() -> None:
    vm = desired(disks=SIZED)
    data = DiskRecord(
        "data", ReclaimPolicy.DELETE, exists=True, path=ROOT_PATH.with_name("data.qcow2"), size_mib=NEW_DATA
    )
    made = {"root": ready()["disks"]["root"], "data": data}
    assert plan(vm, with_storage(1024, disks=made), Memory(), RESERVE, now=NOW).intent is Intent.STARTING
    grown = desired(disks=[SIZED[0], {"name": "data", "size": "12Gi"}])
    result = plan(grown, with_storage(2 * GIB + 1023, disks=made), Memory(), RESERVE, now=NOW)
    assert result.intent is Intent.INSUFFICIENT_STORAGE
    assert result.detail.startswith(f"its new disks need {2 * GIB} MiB")


def test_a_running_vm_is_not_stopped_to_grow_a_disk_there_is_no_room_for() -> None:
    """Growing needs a restart; without room the restart would leave it down, so it runs on."""
    made = {"root": ready()["disks"]["root"]}
    small = desired(disks=[{"name": "root", "image": "base.raw", "size": "1Gi"}])
    running = process(digest_for(small))
    grown = desired(disks=[{"name": "root", "image": "base.raw", "size": "3Gi"}])
    tight = with_storage(2 * GIB + 1023, disks=made, process=running)
    result = plan(grown, tight, Memory(), RESERVE, now=NOW)
    assert (result.intent, result.actions) == (Intent.INSUFFICIENT_STORAGE, ())
    status = compute_status(grown, tight, result, QemuVMStatus(), accel=None, error=None, now=NOW)
    conditions = {c.type: (c.status.value, c.reason) for c in status.conditions}
    assert status.phase.value == "Running"
    assert conditions["Ready"] == ("True", "Running")
    assert conditions["Admitted"] == ("False", "InsufficientStorage")
    roomy = with_storage(2 * GIB + 1024, disks=made, process=running)
    assert plan(grown, roomy, Memory(), RESERVE, now=NOW).intent is Intent.RESTARTING


def test_disks_larger_than_the_filesystem_are_refused() -> None:
    vm = desired(disks=[{"name": f"d{index}", "size": "64Ti"} for index in range(16)])
    result = plan(vm, with_storage(50 * GIB, total=100 * GIB), Memory(), CONTEXT, now=NOW)
    assert (result.intent, result.reason, result.actions) == (Intent.REFUSED, "DiskTooLarge", ())
    assert result.detail == (
        f"its disks add up to {16 * 64 * 1024 * GIB} MiB; the filesystem that holds disks is {100 * GIB} MiB"
        " in all: this host can never hold them"
    )
    fits = desired(disks=[{"name": "root", "image": "base.raw"}, {"name": "d", "size": "100Gi"}])
    assert (
        plan(fits, with_storage(200 * GIB, total=100 * GIB), Memory(), CONTEXT, now=NOW).reason
        != "DiskTooLarge"
    )


def test_unknown_storage_decides_nothing() -> None:
    vm = desired(disks=SIZED)
    assert plan(vm, observed(**ready()), Memory(), RESERVE, now=NOW).intent is Intent.PREPARING


class FakeStatvfs:
    def __init__(self, *, blocks: int, avail: int, frsize: int = 4096) -> None:
        self.f_blocks, self.f_bavail, self.f_frsize = blocks, avail, frsize
        self.f_bfree = avail + 100  # root's reserve: not ours


def test_filesystem_space_reads_statvfs_as_an_unprivileged_writer_would() -> None:
    seen: list[Path] = []

    def fake(path: Path) -> os.statvfs_result:
        seen.append(path)
        return FakeStatvfs(blocks=256 * 1024, avail=1024)  # type: ignore[return-value]

    assert filesystem_space(Path("/data/disks"), fake) == Storage(total_mib=1024, available_mib=4)
    assert seen == [Path("/data/disks")]

    def missing(path: Path) -> os.statvfs_result:
        raise FileNotFoundError(path)

    assert filesystem_space(Path("/nowhere"), missing) is None


def test_filesystem_space_of_a_real_directory(tmp_path: Path) -> None:
    found = filesystem_space(tmp_path)
    assert found is not None
    assert 0 <= found.available_mib <= found.total_mib
