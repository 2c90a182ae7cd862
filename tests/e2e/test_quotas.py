"""Quotas and the host memory reserve, with real QEMU: who runs, who waits and why, who goes next."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import ServerProcess, condition, is_running_current

pytestmark = pytest.mark.e2e

PROJECT = "quota"
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 2,
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
}


def declare(server: ServerProcess, serial: int, names: list[str]) -> None:
    server.declare_vms(PROJECT, serial, dict.fromkeys(names, SPEC))


def is_waiting_for(reason: str) -> Callable[[dict[str, Any]], bool]:
    """The VM's Admitted condition (once the controller wrote one) is False for `reason`."""

    def check(vm: dict[str, Any]) -> bool:
        admitted = [c for c in vm["status"]["conditions"] if c["type"] == "Admitted"]
        return bool(admitted) and (admitted[0]["status"], admitted[0]["reason"]) == ("False", reason)

    return check


def test_the_oldest_vm_runs_the_next_waits_and_starts_when_room_frees(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    server = host.start("serve", extra_args=("--max-vms", "1"))
    declare(server, 1, ["first"])
    host.wait_vm(PROJECT, "first", is_running_current, what="first Running")
    declare(server, 2, ["first", "second"])

    waiting = host.wait_vm(PROJECT, "second", is_waiting_for("QuotaExceeded"), what="second not admitted")
    assert waiting["status"]["phase"] == "Pending"
    assert waiting["status"]["pid"] is None
    assert condition(waiting, "Admitted")["message"] == (
        "server max_vms: 1 requested, 1 in use by older VMs, limit 1"
    )
    assert host.sql("SELECT uid FROM port_allocations") == []
    first = host.vm(PROJECT, "first")
    assert is_running_current(first)
    assert condition(first, "Admitted")["status"] == "True"

    declare(server, 3, ["second"])
    host.wait_gone(PROJECT, "first")
    host.wait_vm(PROJECT, "second", is_running_current, what="second Running once first is gone")


def test_a_start_that_would_eat_the_host_memory_reserve_waits(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    server = host.start("serve", extra_args=("--memory-reserve-mib", str(64 * 1024 * 1024)))
    declare(server, 1, ["web"])
    vm = host.wait_vm(PROJECT, "web", is_waiting_for("HostMemoryLow"), what="web held back")
    assert vm["status"]["phase"] == "Pending"
    assert "keeps 67108864 MiB in reserve" in condition(vm, "Admitted")["message"]
