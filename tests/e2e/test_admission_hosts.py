"""Host ports and disk space at admission, with a real server, real QEMU and (as root) a real
small filesystem: a hostPort outside the range, an unbootable VM, free space and huge disks."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import VmHost, condition, is_running_current
from tests.e2e.test_quotas import SPEC, is_waiting_for

pytestmark = pytest.mark.e2e

PROJECT = "admission"
SMALL_FS_MIB = 64
FILLER_MIB = 40
RESERVE_MIB = 16


def has_reason(type_: str, reason: str) -> Callable[[dict[str, Any]], bool]:
    def check(vm: dict[str, Any]) -> bool:
        found = [c for c in vm["status"]["conditions"] if c["type"] == type_]
        return bool(found) and (found[0]["status"], found[0]["reason"]) == ("False", reason)

    return check


def test_a_host_port_outside_the_range_is_refused_naming_the_field(make_vm_host: MakeVmHost) -> None:
    """The server's own port as a hostPort: Valid=False with the field, and no port is taken."""
    host = make_vm_host()
    server = host.start("serve")
    forwards = [{"guestPort": 22}, {"guestPort": 80, "hostPort": host.port}]
    server.declare_vms(PROJECT, 1, {"web": {**SPEC, "network": {"forwards": forwards}}})
    vm = host.wait_vm(PROJECT, "web", has_reason("Valid", "InvalidSpec"), what="web refused")
    assert condition(vm, "Valid")["message"] == (
        f"spec.network.forwards[1].hostPort: {host.port} is outside the port range {host.port_range}"
        " of this host"
    )
    assert vm["status"]["phase"] == "Invalid"
    assert vm["status"]["pid"] is None
    assert host.sql("SELECT uid FROM port_allocations") == []


def test_an_unbootable_vm_holds_no_ports(make_vm_host: MakeVmHost) -> None:
    """A missing kernel is found before ports are taken; a VM that held ports gives them back."""
    host = make_vm_host()
    server = host.start("serve")
    network = {"forwards": [{"guestPort": 80}]}
    server.declare_vms(PROJECT, 1, {"web": {**SPEC, "network": network}})
    host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    assert len(host.sql("SELECT uid FROM port_allocations")) == 1
    broken = {**SPEC, "boot": {"kernel": "tiny-guest/no-such-vmlinuz"}, "network": network}
    server.declare_vms(PROJECT, 2, {"web": broken, "never": broken})
    host.wait_vm(PROJECT, "never", has_reason("Ready", "ImageNotFound"), what="never waits for its kernel")
    host.wait_vm(PROJECT, "web", has_reason("Ready", "ImageNotFound"), what="web stopped, waits for kernel")
    assert host.sql("SELECT uid FROM port_allocations") == []


@pytest.fixture
def small_disks_fs(make_vm_host: MakeVmHost) -> Iterator[tuple[VmHost, Path]]:
    """A VM host whose disks dir is a 64 MiB tmpfs (mounting needs root)."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        pytest.skip("mounting a small tmpfs for the disks dir needs root and mount(8)")
    host = make_vm_host()
    disks = host.data_dir / "disks"
    disks.mkdir(parents=True, mode=0o700)
    subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={SMALL_FS_MIB}m,mode=0700", "tmpfs", str(disks)],
        check=True,
        timeout=30,
    )
    try:
        yield host, disks
    finally:
        host.close()
        subprocess.run([umount, "--lazy", str(disks)], check=True, timeout=30)


def test_disks_wait_for_free_space_and_never_exceed_the_filesystem(
    small_disks_fs: tuple[VmHost, Path],
) -> None:
    host, disks = small_disks_fs
    filler = disks / "filler.bin"
    filler.write_bytes(b"\1" * (FILLER_MIB * 1024 * 1024))
    server = host.start("serve", extra_args=("--storage-reserve-mib", str(RESERVE_MIB)))
    scratch = {**SPEC, "disks": [{"name": "scratch", "size": "16Mi"}]}
    huge = {**SPEC, "disks": [{"name": "scratch", "size": f"{SMALL_FS_MIB + 1}Mi"}]}
    server.declare_vms(PROJECT, 1, {"scratch": scratch, "huge": huge})

    waiting = host.wait_vm(PROJECT, "scratch", is_waiting_for("InsufficientStorage"), what="no room")
    assert waiting["status"]["phase"] == "Pending"
    message = condition(waiting, "Admitted")["message"]
    assert message.startswith("its new disks need 16 MiB; the disks filesystem has ")
    assert message.endswith(f" MiB free and keeps {RESERVE_MIB} MiB in reserve")
    assert host.sql("SELECT name FROM disks") == []

    refused = host.wait_vm(PROJECT, "huge", has_reason("Synced", "DiskTooLarge"), what="huge refused")
    assert refused["status"]["phase"] == "Failed"
    assert condition(refused, "Synced")["message"] == (
        f"its disks add up to {SMALL_FS_MIB + 1} MiB; the filesystem that holds disks is {SMALL_FS_MIB} MiB"
        " in all: this host can never hold them"
    )

    filler.unlink()
    host.wait_vm(PROJECT, "scratch", is_running_current, what="scratch Running once room frees")
    assert host.sql("SELECT name FROM disks") == [("scratch",)]
