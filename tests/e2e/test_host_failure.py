"""Host failure and fencing, end to end: 1 `tofu-qemu api` and 3 `tofu-qemu controller` processes
on one private PostgreSQL, real Terraform, real QEMU and the real guest (docs/multi-host.md).

- 6 VMs spread 2 + 2 + 2 and serve HTTP.
- host-c is killed whole (its controller and its QEMUs, SIGKILL): its VMs are rescheduled and
  serve from the other hosts; the time is printed.
- host-b's controller is frozen (SIGSTOP) past its lease and grace: its VMs start on host-a
  while its own QEMUs still run (the documented freeze window); after SIGCONT it kills them
  within the documented bound, before anything else. A watcher checks all along that no VM has
  QEMUs on two hosts outside that window, and host-a never restarts a QEMU of its own.
- host-c's controller returns: it starts none of the VMs that moved away and releases their
  ports and runtime dirs; `terraform destroy` leaves nothing on any host.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
import pytest

from api.testing.waiting import wait_until
from controller.self_fence import KILL_WAIT_SECONDS
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import Fleet, GuestVM, VmHost, free_loopback_port, kill_qemus, launched_qemus
from tests.e2e.test_multi_host import hosts_over_http
from tests.postgres import PostgresCluster

pytestmark = pytest.mark.e2e

PROJECT = "failover"
# Short, to keep the test fast; the defaults (15 s, 30 s) are pinned by the unit tests.
LEASE_SECONDS = 6.0
GRACE_SECONDS = 2.0
RENEW_SECONDS = LEASE_SECONDS / 3
# docs/multi-host.md: a controller waking from a freeze kills the QEMUs of its VMs that moved
# away within one renewal period of waking, plus the time the kill takes to be seen.
FREEZE_KILL_BOUND = RENEW_SECONDS + KILL_WAIT_SECONDS
# A lost host's VMs are moved lease + grace after its last renewal, seen by the scheduler's next
# pass (every renewal period); then they boot. Generous for TCG on a loaded machine.
RESCHEDULED_WITHIN = LEASE_SECONDS + GRACE_SECONDS + RENEW_SECONDS + 90.0
K8S_API = "/apis/tofu-qemu.dev/v1alpha1"
NAMES = tuple(f"w{index}" for index in range(6))


def start_controller(host: VmHost, url: str, name: str) -> None:
    host.start(
        "controller",
        extra_args=(
            "--database-url", url,
            "--host-name", name,
            "--host-lease-seconds", str(LEASE_SECONDS),
            "--host-lost-grace-seconds", str(GRACE_SECONDS),
            "--ops-listen", f"127.0.0.1:{free_loopback_port()}",
        ),
    )  # fmt: skip


@dataclass
class DuplicateWatch:
    """Polls every host's live QEMUs; records each moment a VM runs on two hosts at once."""

    hosts: dict[str, VmHost]
    seen: list[tuple[float, str, tuple[str, ...]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.wait(0.05):
            where: dict[str, list[str]] = {}
            for name, host in self.hosts.items():
                for qemu in launched_qemus(host.data_dir):
                    if qemu.is_alive:
                        where.setdefault(qemu.uid, []).append(name)
            now = time.monotonic()
            self.seen += [(now, uid, tuple(sorted(on))) for uid, on in where.items() if len(on) > 1]

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join()


def placements(fleet: Fleet) -> dict[str, str | None]:
    return {name: fleet.vm(name)["status"]["host"] for name in NAMES}


def all_placed(fleet: Fleet) -> Callable[[], dict[str, str | None] | None]:
    def check() -> dict[str, str | None] | None:
        placed = placements(fleet)
        return placed if None not in placed.values() else None

    return check


def running_on(fleet: Fleet, names: list[str], hosts: set[str]) -> None:
    """Each of `names` is placed on one of `hosts` and its QEMU runs there (the move reset the
    lost host's status: Running is the new host's word)."""
    for name in names:
        fleet.wait_vm(
            name,
            lambda vm: vm["status"]["host"] in hosts and vm["status"]["phase"] == "Running",
            what=f"running on {sorted(hosts)}",
            timeout=RESCHEDULED_WITHIN,
        )


def serving_from(fleet: Fleet, names: list[str], hosts: set[str]) -> None:
    """Each of `names` runs on one of `hosts`, and its guest answers HTTP."""
    running_on(fleet, names, hosts)
    for name in names:
        assert fleet.guest_info(name, timeout=RESCHEDULED_WITHIN).name == name


def alive_uids(host: VmHost) -> set[str]:
    return set(live_pids(host))


def test_a_lost_host_is_rescheduled_a_frozen_one_fenced_and_destroy_leaves_nothing(
    postgres_cluster: PostgresCluster, make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    url = postgres_cluster.create_database()
    hosts = {name: make_vm_host() for name in ("host-a", "host-b", "host-c")}
    api = hosts["host-a"].start("api", extra_args=("--database-url", url))
    for name, host in hosts.items():
        start_controller(host, url, name)
    fleet = Fleet(hosts["host-a"], terraform_bin, project=PROJECT)
    fleet.init()
    fleet.apply({name: GuestVM(memory=128) for name in NAMES})
    before = wait_until(all_placed(fleet), timeout=60, what="every VM placed")
    assert sorted(map(str, before.values())) == sorted(["host-a", "host-b", "host-c"] * 2), before
    for name in NAMES:
        fleet.wait_running(name, timeout=180)
    assert placements(fleet) == before, "no host lost its VMs while they booted"
    for name in NAMES:
        assert fleet.guest_info(name, timeout=120).name == name

    # host-a keeps its own VMs through it all: no controller kills a healthy QEMU of its own.
    kept = live_pids(hosts["host-a"])
    watch = DuplicateWatch(hosts)
    watching = watch.start()
    try:
        kill_a_whole_host(fleet, hosts["host-c"], [name for name, on in before.items() if on == "host-c"])
        on_b = [name for name, on in placements(fleet).items() if on == "host-b"]
        frozen_at, woke_at = freeze_a_controller(fleet, hosts["host-b"], on_b)
    finally:
        watch.stop(watching)
    moved_uids = {fleet.vm(name)["metadata"]["uid"] for name in on_b}
    # No VM ran on two hosts at once, but while host-b was frozen or killing after it woke.
    outside = [seen for seen in watch.seen if not frozen_at <= seen[0] <= woke_at + FREEZE_KILL_BOUND]
    assert not outside, outside
    assert {uid for _, uid, _ in watch.seen} <= moved_uids
    last = max((at for at, _, _ in watch.seen), default=woke_at)
    print(f"duplicates only while host-b was frozen, and until {max(last - woke_at, 0):.2f} s after it woke")
    events = api.get_json(f"{K8S_API}/projects/{PROJECT}/events?limit=1000")["items"]
    assert {e["vmName"] for e in events if e["reason"] == "Fenced"} >= set(on_b), events
    assert {e["vmName"] for e in events if e["reason"] == "Rescheduled"} >= set(on_b), events
    assert hosts_over_http(api)["host-b"]["ready"]
    assert live_pids(hosts["host-a"]).items() >= kept.items(), "host-a restarted a VM of its own"

    # host-c returns: it starts none of the VMs that moved away and releases what it held.
    start_controller(hosts["host-c"], url, "host-c")
    wait_until(
        lambda: hosts_over_http(api)["host-c"]["ready"] and not runtime_dirs(hosts["host-c"]),
        timeout=60,
        what="host-c back and its moved VMs' runtime dirs released",
    )
    assert alive_uids(hosts["host-c"]) == set()
    assert rows(url, "SELECT host, uid FROM port_allocations WHERE host = 'host-c'") == []

    fleet.terraform.run("destroy", "-auto-approve")
    wait_until(
        lambda: not rows(url, "SELECT uid FROM vms") and not any(alive_uids(h) for h in hosts.values()),
        timeout=120,
        what="every VM removed and every QEMU gone",
    )
    left = {name: runtime_dirs(host) for name, host in hosts.items()}
    assert not any(left.values()), left
    assert rows(url, "SELECT host, uid FROM port_allocations") == []


def kill_a_whole_host(fleet: Fleet, host: VmHost, names: list[str]) -> None:
    """SIGKILL the host's controller and its QEMUs: its VMs serve from the other hosts."""
    host.server("controller").kill()
    kill_qemus(host.data_dir)
    killed_at = time.monotonic()
    serving_from(fleet, names, {"host-a", "host-b"})
    took = time.monotonic() - killed_at
    print(f"host-c killed: its {len(names)} VMs serve from other hosts {took:.1f} s later")


def freeze_a_controller(fleet: Fleet, host: VmHost, names: list[str]) -> tuple[float, float]:
    """SIGSTOP the host's controller until its VMs run on host-a, then SIGCONT: it kills their
    QEMUs here within the bound. Returns when it froze and woke (monotonic)."""
    uids = {fleet.vm(name)["metadata"]["uid"] for name in names}
    controller = host.server("controller")
    pid = controller.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        running_on(fleet, names, {"host-a"})
        assert alive_uids(host) >= uids, "a frozen controller's QEMUs run on"
    finally:
        os.kill(pid, signal.SIGCONT)
    woke_at = time.monotonic()
    wait_until(
        lambda: not alive_uids(host) & uids,
        timeout=FREEZE_KILL_BOUND + 30,
        what="the woken controller to kill the QEMUs of the VMs that moved away",
    )
    killed_after = time.monotonic() - woke_at
    print(
        f"host-b frozen {woke_at - frozen_at:.1f} s; its {len(names)} moved VMs' QEMUs gone "
        f"{killed_after:.2f} s after SIGCONT (bound {FREEZE_KILL_BOUND:.2f} s)"
    )
    assert killed_after <= FREEZE_KILL_BOUND
    return frozen_at, woke_at


def live_pids(host: VmHost) -> dict[str, int]:
    return {qemu.uid: qemu.pid for qemu in launched_qemus(host.data_dir) if qemu.is_alive}


def runtime_dirs(host: VmHost) -> list[str]:
    run = host.data_dir / "run"
    return sorted(entry.name for entry in run.iterdir()) if run.is_dir() else []


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as connection:
        return list(connection.execute(query).fetchall())
