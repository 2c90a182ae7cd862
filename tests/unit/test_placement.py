"""place(vms, hosts, now): which host each unplaced VM goes to, as a table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from api.hosts import Demand, Host, PlacedVM, Resources, demand_of
from controller.placement import HOSTS_IN_REASON, lost_hosts, lost_notes, place

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def host(
    name: str,
    *,
    memory: int = 4096,
    cpus: int = 4,
    ports: int = 100,
    labels: dict[str, str] | None = None,
    cordoned: bool = False,
    renewed_ago: float = 1.0,
) -> Host:
    return Host(
        name=name,
        labels=labels or {},
        capacity=Resources(cpus, memory, ports),
        cordoned=cordoned,
        registered_at=NOW - timedelta(hours=1),
        lease_renewed_at=NOW - timedelta(seconds=renewed_ago),
        lease_seconds=15.0,
        epoch=1,
    )


def vm(
    uid: str,
    *,
    on: str | None = None,
    memory: int = 512,
    cpus: int = 1,
    ports: int = 0,
    selector: dict[str, str] | None = None,
) -> PlacedVM:
    return PlacedVM(uid, "p", uid, on, Demand(Resources(cpus, memory, ports), selector or {}))


def test_vms_spread_over_the_hosts_by_default() -> None:
    placement = place([vm(f"vm{i}") for i in range(4)], [host("a"), host("b")], NOW)
    assert placement.assignments == {"vm0": "a", "vm1": "b", "vm2": "a", "vm3": "b"}
    assert placement.unschedulable == {}


def test_placed_vms_count_against_their_host_and_are_never_moved() -> None:
    vms = [vm("old1", on="a", memory=2048), vm("old2", on="a"), vm("new")]
    placement = place(vms, [host("a"), host("b")], NOW)
    assert placement.assignments == {"new": "b"}


def test_the_least_loaded_host_wins_by_the_larger_of_memory_and_cpu_shares() -> None:
    # a: memory half used; b: cpus 3/4 used. b's share after (1.0 cpu) is larger than a's.
    vms = [vm("m", on="a", memory=2048), vm("c", on="b", memory=64, cpus=3), vm("new", memory=64)]
    assert place(vms, [host("a"), host("b")], NOW).assignments == {"new": "a"}


@pytest.mark.parametrize(
    ("hosts", "refusal"),
    [
        pytest.param([host("a", renewed_ago=15.0)], "a: NotReady", id="lease-expired"),
        pytest.param([host("a", cordoned=True)], "a: cordoned", id="cordoned"),
        pytest.param([host("a", memory=1000)], "a: 1000 of 1000 MiB free", id="memory"),
        pytest.param([host("a", ports=0)], "a: 0 of 0 ports free", id="ports"),
        pytest.param([host("a", labels={"zone": "y"})], "a: no label zone=x", id="selector"),
        pytest.param([], "no host is registered", id="no-hosts"),
    ],
)
def test_no_fit_gives_the_reason_and_the_numbers(hosts: list[Host], refusal: str) -> None:
    demand = vm(
        "big", memory=2000, cpus=2, ports=1, selector={"zone": "x"} if hosts and hosts[0].labels else None
    )
    placement = place([demand], hosts, NOW)
    assert placement.assignments == {}
    reason = placement.unschedulable["big"]
    assert reason.startswith("no host fits 2000 MiB, 2 vCPU(s), 1 port(s)")
    assert reason.endswith(refusal)


def test_a_node_selector_picks_only_hosts_with_every_label() -> None:
    hosts = [host("a", labels={"zone": "x"}), host("b", labels={"zone": "x", "gpu": "yes"})]
    placement = place([vm("g", selector={"zone": "x", "gpu": "yes"})], hosts, NOW)
    assert placement.assignments == {"g": "b"}


def test_vcpus_are_overcommitted_as_on_one_host() -> None:
    placement = place([vm("wide", cpus=16)], [host("a", cpus=2)], NOW)
    assert placement.assignments == {"wide": "a"}


def test_memory_fills_up_within_one_pass() -> None:
    placement = place([vm("one", memory=3000), vm("two", memory=3000)], [host("a")], NOW)
    assert placement.assignments == {"one": "a"}
    assert placement.unschedulable["two"].endswith("a: 1096 of 4096 MiB free")


def test_the_reason_names_at_most_eight_hosts() -> None:
    hosts = [host(f"h{i:02}", cordoned=True) for i in range(HOSTS_IN_REASON + 3)]
    reason = place([vm("x")], hosts, NOW).unschedulable["x"]
    assert HOSTS_IN_REASON == 8
    assert reason.count(": cordoned") == 8
    assert reason.endswith("; and 3 more")


def test_demand_of_a_spec_counts_forwards_without_host_port() -> None:
    spec = {
        "cpus": 2,
        "memory": 1024,
        "network": {"forwards": [{"guestPort": 22}, {"guestPort": 80, "hostPort": 8080}]},
        "nodeSelector": {"zone": "x"},
    }
    assert demand_of(spec) == Demand(Resources(2, 1024, 1), {"zone": "x"})
    assert demand_of(None) == Demand()
    assert demand_of({"memory": "garbage"}) == Demand()


def test_a_host_is_lost_once_its_lease_ran_out_longer_than_the_grace() -> None:
    grace = timedelta(seconds=30)
    hosts = [host("fresh"), host("late", renewed_ago=44.9), host("gone", renewed_ago=45.0)]
    lost = lost_hosts(hosts, NOW, grace)
    assert list(lost) == ["gone"]
    assert (
        lost["gone"] == f"host gone lost: no lease renewal since {(NOW - timedelta(seconds=45)).isoformat()}"
    )


def test_vms_of_a_lost_host_are_noted_and_cleared_when_it_returns() -> None:
    lost = {"gone": "host gone lost"}
    vms = [
        vm("there", on="gone"),
        vm("elsewhere", on="fresh"),
        vm("unplaced"),
        PlacedVM("noted", "p", "noted", "gone", Demand(), "host gone lost"),
        PlacedVM("back", "p", "back", "fresh", Demand(), "host fresh lost"),
    ]
    assert lost_notes(vms, lost) == {"there": "host gone lost", "back": None}
