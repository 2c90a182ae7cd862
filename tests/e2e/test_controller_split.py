"""`tofu-qemu api` and `tofu-qemu controller` as two processes on one data dir.

The controller cannot be told about the API's writes in-process here, so it must see them by
polling SQLite's `PRAGMA data_version` (controller/sources.py).
"""

from __future__ import annotations

import pytest

from controller.qemu.process import read_stat
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    Fleet,
    GuestVM,
    get_guest_page,
    host_port,
    memory_argument,
    runs_generation,
)

pytestmark = pytest.mark.e2e

PROJECT = "split"


def test_api_and_controller_processes_converge_on_spec_changes(
    make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    """With `api` and `controller` apart, an applied VM boots and a memory change restarts it with 160M."""
    host = make_vm_host()
    host.start("api")
    controller = host.start("controller")
    fleet = Fleet(host, terraform_bin, project=PROJECT)
    fleet.init()

    fleet.apply({"solo": GuestVM(memory=128)})

    first = fleet.wait_vm("solo", runs_generation(1), what="Running at generation 1")
    stat = read_stat(first["status"]["pid"])
    assert stat is not None
    supervisor = read_stat(stat.parent_pid)  # QEMU's parent is its per-VM supervisor
    assert supervisor is not None
    assert supervisor.parent_pid == controller.pid, "QEMU should be started by the controller process"
    status, body = get_guest_page(host_port(first), "/", timeout=GUEST_BOOT_TIMEOUT)
    assert (status, "<h1>solo</h1>" in body) == (200, True), body

    fleet.apply({"solo": GuestVM(memory=160)})

    second = fleet.wait_vm(
        "solo",
        lambda vm: runs_generation(2)(vm) and vm["status"]["pid"] != first["status"]["pid"],
        what="Running with a new pid at generation 2",
    )
    assert memory_argument(second["status"]["pid"]) == "160M"
    assert host.server("api").is_running
    assert '"vm_spawned"' not in host.server("api").log_text()
