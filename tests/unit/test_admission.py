"""admit(claims, quotas): oldest first, per server and per project, with the numbers in the message."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from controller.admission import Admission, Claim, Quota, Quotas, admit, parse_project_quotas
from controller.model import Memory
from controller.plan import Intent, plan
from tests.unit.test_plan import CONTEXT, NOW, desired, digest_for, observed, process, ready

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def claim(
    uid: str, *, age_rank: int, project: str = "lab", memory: int = 512, cpus: int = 1, disk: int = 0
) -> Claim:
    return Claim(uid, project, T0 + timedelta(minutes=age_rank), cpus, memory, disk)


def admitted(verdicts: dict[str, Admission]) -> list[str]:
    return sorted(uid for uid, verdict in verdicts.items() if verdict.admitted)


def test_no_limits_admit_everything() -> None:
    claims = [claim(f"vm-{i}", age_rank=i) for i in range(5)]
    assert admitted(admit(claims, Quotas())) == [f"vm-{i}" for i in range(5)]


def test_oldest_first_whatever_the_input_order() -> None:
    claims = [claim("new", age_rank=2), claim("old", age_rank=0), claim("mid", age_rank=1)]
    verdicts = admit(claims, Quotas(server=Quota(max_vms=2)))
    assert admitted(verdicts) == ["mid", "old"]
    assert verdicts["new"].message == "server max_vms: 1 requested, 2 in use by older VMs, limit 2"


def test_project_limits_leave_other_projects_alone() -> None:
    claims = [
        claim("a1", age_rank=0, memory=1024),
        claim("a2", age_rank=1, memory=1024),
        claim("b1", age_rank=2, project="other", memory=1024),
    ]
    verdicts = admit(claims, Quotas(projects={"lab": Quota(max_memory_mib=1536)}))
    assert admitted(verdicts) == ["a1", "b1"]
    assert verdicts["a2"].message == (
        "project lab max_memory_mib: 1024 MiB requested, 1024 MiB in use by older VMs, limit 1536 MiB"
    )


def test_a_vm_that_does_not_fit_consumes_nothing_and_a_smaller_later_one_may_fit() -> None:
    claims = [claim("big", age_rank=0, cpus=8), claim("small", age_rank=1, cpus=2), claim("tiny", age_rank=2)]
    verdicts = admit(claims, Quotas(server=Quota(max_vcpus=3)))
    assert admitted(verdicts) == ["small", "tiny"]
    assert "server max_vcpus: 8 requested, 0 in use" in verdicts["big"].message


def test_disk_limits_count_sizes_in_gib() -> None:
    claims = [claim("a", age_rank=0, disk=1024), claim("b", age_rank=1, disk=2048)]
    verdicts = admit(claims, Quotas(server=Quota(max_disk_gib=2)))
    assert admitted(verdicts) == ["a"]
    assert verdicts["b"].message.endswith("limit 2 GiB")


def test_snapshots_hold_disk_space_before_any_vm() -> None:
    """A project's snapshots count against max_disk_gib, server-wide and in their project only."""
    claims = [claim("a", age_rank=0, disk=1024), claim("b", age_rank=1, project="ci", disk=1024)]
    quotas = Quotas(projects={"lab": Quota(max_disk_gib=2)}, server=Quota(max_disk_gib=4))
    verdicts = admit(claims, quotas, {"lab": 1536})
    assert admitted(verdicts) == ["b"]
    assert verdicts["a"].message == (
        "project lab max_disk_gib: 1024 MiB requested, 1536 MiB in use by older VMs and snapshots,"
        " limit 2 GiB"
    )
    server_full = admit(claims, quotas, {"other": 3 * 1024})
    assert admitted(server_full) == ["a"], "the server's limit counts every project's snapshots"
    assert admitted(admit(claims, quotas, {})) == ["a", "b"]


def test_freeing_room_admits_the_next() -> None:
    claims = [claim("old", age_rank=0), claim("new", age_rank=1)]
    quotas = Quotas(server=Quota(max_vms=1))
    assert admitted(admit(claims, quotas)) == ["old"]
    assert admitted(admit(claims[1:], quotas)) == ["new"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lab:max_vms=3,max_memory_mib=2048", {"lab": Quota(max_vms=3, max_memory_mib=2048)}),
        ("lab:max_vcpus=4; ci:max_disk_gib=10;", {"lab": Quota(max_vcpus=4), "ci": Quota(max_disk_gib=10)}),
        ("", {}),
    ],
)
def test_project_quotas_parse(text: str, expected: dict[str, Quota]) -> None:
    assert parse_project_quotas(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lab", "must look like PROJECT:max_vms=N"),
        ("lab:max_cpus=2", "expected one of max_vms, max_memory_mib, max_vcpus, max_disk_gib"),
        ("lab:max_vms=0", "must be a positive integer"),
        ("lab:max_vms=-1", "must be a positive integer"),
        ("lab:max_vms=2x", "must be a positive integer"),
    ],
)
def test_bad_project_quotas_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_project_quotas(text)


def test_plan_waits_without_taking_resources_when_not_admitted() -> None:
    vm = replace(
        desired(), admission=Admission(False, "server max_vms: 1 requested, 2 in use by older VMs, limit 2")
    )
    result = plan(vm, observed(), Memory(), CONTEXT, now=NOW)
    assert result.intent is Intent.QUOTA_EXCEEDED
    assert result.actions == ()
    assert result.detail.startswith("server max_vms")
    assert result.requeue_after is not None


def test_plan_never_stops_a_running_vm_over_quota() -> None:
    vm = desired()
    running = observed(**ready(process=process(digest_for(vm))))
    over = replace(vm, admission=Admission(False, "limit lowered"))
    assert plan(over, running, Memory(), CONTEXT, now=NOW).intent is Intent.RUNNING


def test_plan_keeps_the_host_memory_reserve() -> None:
    vm = desired(memory=1024)
    context = replace(CONTEXT, memory_reserve_mib=512)
    low = plan(vm, observed(**ready(host_memory_available_mib=1400)), Memory(), context, now=NOW)
    assert low.intent is Intent.HOST_MEMORY_LOW
    assert low.detail == (
        "starting needs 1024 MiB; the host has 1400 MiB available and keeps 512 MiB in reserve"
    )
    enough = plan(vm, observed(**ready(host_memory_available_mib=1600)), Memory(), context, now=NOW)
    assert enough.intent is Intent.STARTING
