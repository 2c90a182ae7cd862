"""A hung QEMU (SIGSTOP: alive, but its QMP never answers) is found by the liveness pass's look at
/proc, asked over QMP, and replaced."""

from __future__ import annotations

import os
import signal

import pytest

from api.testing.tfstate import encode, vm_state
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    is_running_current,
    live_qemu_pids,
    running_identity,
)

pytestmark = pytest.mark.e2e

SPEC = {
    "memory": 128,
    "accel": "tcg",
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
}


def test_a_stopped_qemu_is_killed_and_restarted(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    server = host.start("serve", extra_args=("--liveness-seconds", "2"))
    answer = server.request("POST", "/state/hung", body=encode(vm_state(1, {"web": SPEC})))
    assert answer.status == 200
    before = host.wait_vm("hung", "web", is_running_current, what="web Running")
    hung = running_identity(before["status"]["pid"])

    os.kill(hung.pid, signal.SIGSTOP)

    after = host.wait_vm(
        "hung",
        "web",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != hung.pid,
        what="web Running again in a new QEMU",
        timeout=60,
    )
    assert not hung.is_running
    assert after["status"]["restarts"] == before["status"]["restarts"] + 1
    assert live_qemu_pids(host.data_dir) == {after["status"]["pid"]}
    log = server.log_text()
    assert '"liveness_ask"' in log
    assert '"vm_killed"' in log
