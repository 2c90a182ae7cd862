"""Kill -9 the controller right after each step of create and delete; nothing is lost or leaked.

`TOFU_QEMU_CRASH_AT` (controller/faults.py) makes the server SIGKILL itself after the named
step. It is then restarted without it, and every port, disk, runtime dir and QEMU process is
checked against the VM objects: after the create the VM runs with exactly one QEMU and the
resources its status names; after the delete nothing of it remains anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until
from controller.faults import CRASH_ENV, CrashPoint
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    ServerProcess,
    VmHost,
    is_running_current,
    live_qemu_pids,
    running_identity,
)

pytestmark = pytest.mark.e2e

PROJECT = "crash"
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 2,  # a guest still booting ignores the power button: do not wait long
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
    "disks": [{"name": "scratch", "size": "8Mi"}],
    "network": {"forwards": [{"guestPort": 80}]},
}
CRASH_TIMEOUT = 60.0
CREATE_POINTS = [CrashPoint.AFTER_PORT_ALLOCATION, CrashPoint.AFTER_DISK_CREATION, CrashPoint.AFTER_SPAWN]
DELETE_POINTS = [CrashPoint.MID_STOP, CrashPoint.AFTER_PORT_RELEASE, CrashPoint.AFTER_DISK_DELETION]


def post(server: ServerProcess, serial: int, vms: dict[str, dict[str, Any]]) -> bytes:
    """POST a state; a server that kills itself while answering is fine (it stored or not)."""
    body = encode(vm_state(serial, vms))
    with contextlib.suppress(OSError):
        server.request("POST", f"/state/{PROJECT}", body=body)
    return body


def wait_crashed(server: ServerProcess, point: CrashPoint) -> None:
    wait_until(lambda: not server.is_running, timeout=CRASH_TIMEOUT, what=f"the server to crash at {point}")
    assert server.stop() == -9, "it died by its own SIGKILL, not otherwise"


def restart(host: VmHost, env: dict[str, str]) -> ServerProcess:
    server = host.server("serve")
    server.extra_env = env
    server.start()
    return server


def assert_accounted_for(host: VmHost, vm: dict[str, Any]) -> None:
    """One QEMU, the ports status shows, one disk file, one runtime dir: all this VM's."""
    uid = vm["metadata"]["uid"]
    assert live_qemu_pids(host.data_dir) == {vm["status"]["pid"]}
    ports = host.sql("SELECT uid, protocol, guest_port, host_port FROM port_allocations")
    assert ports == [(uid, "tcp", 80, vm["status"]["ports"][0]["hostPort"])]
    disks = host.sql("SELECT uid, path FROM disks")
    assert [row[0] for row in disks] == [uid]
    assert Path(disks[0][1]).is_file()
    assert sorted(p.name for p in (host.data_dir / "run").iterdir()) == [uid]


def assert_nothing_left(host: VmHost) -> None:
    assert live_qemu_pids(host.data_dir) == set()
    assert host.sql("SELECT uid FROM port_allocations") == []
    assert host.sql("SELECT uid FROM disks") == []
    assert list((host.data_dir / "run").iterdir()) == []
    disks_root = host.data_dir / "disks"
    assert not disks_root.exists() or list(disks_root.iterdir()) == []


def assert_state_is(host: VmHost, body: bytes) -> None:
    answer = host.server("serve").request("GET", f"/state/{PROJECT}")
    assert answer.status == 200
    assert hashlib.md5(answer.body).hexdigest() == hashlib.md5(body).hexdigest()  # noqa: S324


@pytest.mark.parametrize("point", CREATE_POINTS, ids=str)
def test_crash_during_create(make_vm_host: MakeVmHost, point: CrashPoint) -> None:
    host = make_vm_host()
    server = restart(host, {CRASH_ENV: point.value})
    body = post(server, 1, {"web": SPEC})
    wait_crashed(server, point)

    restart(host, {})
    assert_state_is(host, body)
    vm = host.wait_vm(PROJECT, "web", is_running_current, what="web Running after the restart")
    assert_accounted_for(host, vm)
    if point is CrashPoint.AFTER_SPAWN:
        assert vm["status"]["restarts"] == 0, "the QEMU spawned before the crash is adopted"

    post(host.server("serve"), 2, {})
    host.wait_gone(PROJECT, "web")
    assert_nothing_left(host)


@pytest.mark.parametrize("point", DELETE_POINTS, ids=str)
def test_crash_during_delete(make_vm_host: MakeVmHost, point: CrashPoint) -> None:
    host = make_vm_host()
    server = restart(host, {})
    post(server, 1, {"web": SPEC})
    vm = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    assert_accounted_for(host, vm)
    assert server.stop() == 0  # the VM keeps running, to be adopted

    server = restart(host, {CRASH_ENV: point.value})
    body = post(server, 2, {})
    wait_crashed(server, point)

    restart(host, {})
    assert_state_is(host, body)
    host.wait_gone(PROJECT, "web")
    assert_nothing_left(host)
    log = host.server("serve").log_text()
    assert not [line for line in log.splitlines() if '"reconcile_crashed"' in line], json.dumps(log[-3000:])


def test_a_crash_right_after_a_restart_keeps_the_exit_counted(make_vm_host: MakeVmHost) -> None:
    """The exit that caused a restart is in status before the respawn clears its record."""
    host = make_vm_host()
    server = restart(host, {})
    post(server, 1, {"web": SPEC})
    before = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    assert server.stop() == 0

    server = restart(host, {CRASH_ENV: CrashPoint.AFTER_SPAWN.value})
    host.wait_vm(PROJECT, "web", is_running_current, what="web adopted")
    os.kill(before["status"]["pid"], signal.SIGKILL)
    wait_crashed(server, CrashPoint.AFTER_SPAWN)

    restart(host, {})
    after = host.wait_vm(
        PROJECT,
        "web",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != before["status"]["pid"],
        what="web Running in its new QEMU",
    )
    assert after["status"]["restarts"] == before["status"]["restarts"] + 1
    assert after["status"]["lastExit"] is not None
    assert live_qemu_pids(host.data_dir) == {after["status"]["pid"]}


def test_a_runtime_dir_removed_while_the_controller_was_down_gives_no_duplicate(
    make_vm_host: MakeVmHost,
) -> None:
    """The QEMU left without its runtime dir is found by its working dir and replaced, not doubled."""
    host = make_vm_host()
    server = restart(host, {})
    post(server, 1, {"web": SPEC})
    before = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    old_qemu = running_identity(before["status"]["pid"])
    assert server.stop() == 0
    shutil.rmtree(host.data_dir / "run" / before["metadata"]["uid"])

    restart(host, {})
    after = host.wait_vm(
        PROJECT,
        "web",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != before["status"]["pid"],
        what="web Running in a new QEMU",
    )
    assert live_qemu_pids(host.data_dir) == {after["status"]["pid"]}
    assert not old_qemu.is_running
