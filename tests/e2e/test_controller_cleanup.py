"""What the controller leaves behind when VMs go away: nothing.

Each test has its own data dir and server, because each ends with VMs torn down. "Nothing" is
checked where it lives: /proc (no QEMU of ours runs), the ledger tables, DATA/disks and DATA/run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    Fleet,
    GuestVM,
    live_qemu_pids,
    running_identity,
)

pytestmark = pytest.mark.e2e

PROJECT = "cleanup"
PAIR = {"alpha": GuestVM(memory=128), "bravo": GuestVM(memory=128)}


def _running_pair(make_vm_host: MakeVmHost, terraform_bin: str) -> Fleet:
    """A served host with alpha and bravo applied, Running, and booted (so a power-off is quick)."""
    host = make_vm_host()
    host.start("serve")
    fleet = Fleet(host, terraform_bin, project=PROJECT)
    fleet.init()
    fleet.apply(PAIR)
    for name in PAIR:
        fleet.wait_running(name)
    for name in PAIR:
        fleet.guest_info(name)
    return fleet


def _disk_path(fleet: Fleet, uid: str) -> Path:
    rows = fleet.host.sql("SELECT path FROM disks WHERE uid = ?", uid)
    assert len(rows) == 1, rows
    return Path(rows[0][0])


def _port_rows(fleet: Fleet, uid: str) -> list[tuple[Any, ...]]:
    return fleet.host.sql("SELECT protocol, guest_port, host_port FROM port_allocations WHERE uid = ?", uid)


def test_vm_removed_while_the_controller_was_down_is_torn_down_at_its_start(
    make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    """bravo, removed through `api` alone, loses QEMU, port, disk and run dir once `serve` is back."""
    fleet = _running_pair(make_vm_host, terraform_bin)
    host = fleet.host
    alpha, bravo = fleet.vm("alpha"), fleet.vm("bravo")
    uid, bravo_process = bravo["metadata"]["uid"], running_identity(bravo["status"]["pid"])
    disk = _disk_path(fleet, uid)
    assert disk.is_file()
    assert _port_rows(fleet, uid) == [("tcp", 80, bravo["status"]["ports"][0]["hostPort"])]
    assert (host.data_dir / "run" / uid).is_dir()

    assert host.stop("serve") == 0
    host.start("api")
    fleet.apply({"alpha": PAIR["alpha"]})
    assert fleet.vm("bravo")["metadata"]["deletionTimestamp"] is not None
    assert bravo_process.is_running, "with no controller running, nothing may stop bravo"
    assert host.stop("api") == 0
    host.start("serve")

    host.wait_gone(PROJECT, "bravo")
    assert not bravo_process.is_running
    assert _port_rows(fleet, uid) == []
    assert host.sql("SELECT name FROM disks WHERE uid = ?", uid) == []
    assert not disk.exists()
    assert not disk.parent.exists()
    assert not (host.data_dir / "run" / uid).exists()
    after = fleet.wait_running("alpha")
    assert after["status"]["pid"] == alpha["status"]["pid"]
    assert live_qemu_pids(host.data_dir) == {alpha["status"]["pid"]}


def test_destroy_leaves_no_qemu_port_disk_or_runtime_dir(
    make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    """After `terraform destroy` both VM objects are gone (404) and so is everything they held."""
    fleet = _running_pair(make_vm_host, terraform_bin)
    host = fleet.host
    processes = [running_identity(fleet.vm(name)["status"]["pid"]) for name in PAIR]
    assert len(host.sql("SELECT uid FROM port_allocations")) == len(PAIR)

    fleet.terraform.run("destroy", "-auto-approve")

    for name in PAIR:
        host.wait_gone(PROJECT, name)
    assert live_qemu_pids(host.data_dir) == set()
    assert not any(process.is_running for process in processes)
    assert host.sql("SELECT uid, host_port FROM port_allocations") == []
    assert host.sql("SELECT uid, name FROM disks") == []
    assert list((host.data_dir / "disks").iterdir()) == []
    assert [path for path in (host.data_dir / "run").iterdir() if path.is_dir()] == []
    assert host.request("GET", f"/api/v1/projects/{PROJECT}/vms").json()["items"] == []
