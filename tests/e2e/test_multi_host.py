"""Two hosts on one PostgreSQL store: 1 `tofu-qemu api` and 2 `tofu-qemu controller` processes,
each controller with its own data dir, port range and host name, real Terraform and real QEMU.

VMs spread over both hosts and run there; `get hosts` shows both Ready; a controller killed with
SIGKILL (its QEMUs left running) makes its host NotReady once its lease runs out, by the
database's clock.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    Fleet,
    GuestVM,
    ServerProcess,
    VmHost,
    free_loopback_port,
    host_port,
    launched_qemus,
    live_qemu_pids,
)
from tests.e2e.test_cli import Cli
from tests.postgres import PostgresCluster

pytestmark = pytest.mark.e2e

PROJECT = "hosts"
# Short, so NotReady comes quickly; the default (15 s) is pinned by tests/unit/test_host_settings.py.
LEASE_SECONDS = 4.0
# NotReady comes one lease after the last renewal, so at most one lease after the kill; the
# rest is slack for a loaded machine.
NOT_READY_WITHIN = LEASE_SECONDS + 5.0


def start_controller(host: VmHost, url: str, name: str) -> None:
    host.start(
        "controller",
        extra_args=(
            "--database-url", url,
            "--host-name", name,
            "--host-labels", f"machine={name}",
            "--host-lease-seconds", str(LEASE_SECONDS),
            "--ops-listen", f"127.0.0.1:{free_loopback_port()}",
        ),
    )  # fmt: skip


def hosts_over_http(api: ServerProcess) -> dict[str, dict[str, Any]]:
    answer = api.request("GET", "/api/v1/hosts")
    assert answer.status == 200, answer.body
    return {host["name"]: host for host in answer.json()["items"]}


def hosts_by_name(cli: Cli) -> dict[str, dict[str, object]]:
    return {host["name"]: host for host in json.loads(cli.run("get", "hosts", "-o", "json"))["items"]}


def test_vms_spread_over_two_hosts_and_a_killed_controller_makes_its_host_not_ready(
    postgres_cluster: PostgresCluster, make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    url = postgres_cluster.create_database()
    first, second = make_vm_host(), make_vm_host()
    api = first.start("api", extra_args=("--database-url", url))
    start_controller(first, url, "host-a")
    start_controller(second, url, "host-b")
    fleet = Fleet(first, terraform_bin, project=PROJECT)
    fleet.init()
    names = ("w0", "w1", "w2", "w3")
    fleet.apply({name: GuestVM(memory=128) for name in names})

    vms = {name: fleet.wait_running(name, timeout=120) for name in names}
    placed = {name: vm["status"]["host"] for name, vm in vms.items()}
    assert sorted(placed.values()) == ["host-a", "host-a", "host-b", "host-b"], placed
    # Each host runs its own VMs' QEMUs, under its own data dir, with ports of its own range.
    # (By uid, not pid: on a loaded machine a guest may be restarted meanwhile.)
    for host, data in (("host-a", first), ("host-b", second)):
        uids = {vm["metadata"]["uid"] for vm in vms.values() if vm["status"]["host"] == host}
        assert {qemu.uid for qemu in launched_qemus(data.data_dir)} == uids
        low, high = map(int, data.port_range.split("-"))
        assert all(low <= host_port(vm) <= high for vm in vms.values() if vm["status"]["host"] == host)

    cli = Cli(api)
    table = cli.run("get", "hosts")
    assert [line.split()[:3] for line in table.splitlines()[1:]] == [
        ["host-a", "Ready", "2"],
        ["host-b", "Ready", "2"],
    ], table
    assert hosts_by_name(cli)["host-b"]["labels"] == {"machine": "host-b"}

    b_qemus = live_qemu_pids(second.data_dir)
    assert len(b_qemus) == 2
    second.server("controller").kill()
    killed_at = time.monotonic()
    # Over HTTP, not the CLI: a Python start per poll would blur the figure on a loaded machine.
    while (host_b := hosts_over_http(api)["host-b"])["ready"]:
        assert time.monotonic() - killed_at < NOT_READY_WITHIN, "host-b stayed Ready past its lease"
        time.sleep(0.1)
    not_ready_after = time.monotonic() - killed_at
    # Not before one lease after its last renewal (PostgreSQL runs on this machine's clock).
    last_renewal = datetime.fromisoformat(host_b["leaseRenewedAt"]).timestamp()
    assert time.time() - last_renewal >= LEASE_SECONDS - 0.1, (time.time(), host_b)
    time.sleep(LEASE_SECONDS / 3 + 0.5)
    assert hosts_over_http(api)["host-b"]["leaseRenewedAt"] == host_b["leaseRenewedAt"], "a dead host renewed"
    print(
        f"host-b NotReady {not_ready_after:.1f} s after its controller was killed (lease {LEASE_SECONDS} s)"
    )
    assert hosts_by_name(cli)["host-a"]["ready"]
    assert live_qemu_pids(second.data_dir) == b_qemus, "killing the controller must leave its QEMUs running"
    assert "Ready" in cli.run("get", "hosts", "host-a")
    assert "NotReady" in cli.run("get", "hosts", "host-b")
