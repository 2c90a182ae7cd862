"""What a serving tofu-qemu writes is readable only by its user: the store with its -wal and
-shm, the lock file, the runtime dir of a running VM (QMP socket, pidfile, console log, launch
record, cloud-init seed holding the user data) and its disk. The data dir existed before the
first start with mode 0755, as `mkdir` leaves it, and the server starts under umask 022."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import is_running_current

pytestmark = pytest.mark.e2e

PROJECT = "private"
SECRET = "hunter2-in-user-data"
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 2,
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
    "disks": [{"name": "scratch", "size": "8Mi"}],
    "cloudInit": {"userData": f"#!/bin/sh\necho {SECRET}\n"},
}


def open_to_others(root: Path) -> list[str]:
    """Every path under `root` (itself included) that its group or others may use, with its mode.
    Groups may list a 0750 dir; nothing else is open."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077 and not (path == root and mode == 0o750):
            found.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return found


def test_a_running_vm_leaves_nothing_readable_by_others(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    host.data_dir.mkdir(mode=0o755)
    host.data_dir.chmod(0o755)
    previous = os.umask(0o022)  # the server inherits it; it must not matter
    try:
        server = host.start("serve")
    finally:
        os.umask(previous)
    server.declare_vms(PROJECT, 1, {"web": SPEC})
    vm = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    runtime = host.data_dir / "run" / vm["metadata"]["uid"]
    written = {path.name for path in runtime.iterdir()}
    assert {"qmp.sock", "serial.log"} <= written, written
    assert any((host.data_dir / "disks").rglob("*.qcow2")), "the disk exists"
    assert open_to_others(host.data_dir) == []
    assert stat.S_IMODE(host.data_dir.stat().st_mode) == 0o700
    assert "data_dir_tightened" in server.log_text()
