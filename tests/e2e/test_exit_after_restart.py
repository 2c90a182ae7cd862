"""A controller restart does not cost the exit reason: QEMU's supervisor records its wait status.

Before supervisors, an adopted QEMU (not the restarted controller's child) that died was recorded
as `vanished`, and so was one that died while no controller ran.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until
from controller.qemu.process import is_running_process
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    VmHost,
    is_running_current,
    runs_generation,
)
from tests.e2e.test_guest_boot import Qmp

pytestmark = pytest.mark.e2e

PROJECT = "exits"
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
}
QMP_TIMEOUT = 10.0
GUEST_READY = b"TOFU-GUEST-READY"
POWEROFF_TIMEOUT = 30.0


def _declare(host: VmHost, serial: int, spec: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    vm = {**spec, "labels": labels} if labels else spec
    answer = host.servers["serve"].request(
        "POST", f"/state/{PROJECT}", body=encode(vm_state(serial, {"web": vm}))
    )
    assert answer.status == 200, answer.body


def _restart_server_with_kill_9(host: VmHost) -> None:
    host.servers["serve"].kill()
    host.start("serve")


def test_kill_9_of_an_adopted_qemu_is_recorded_as_signal_9(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    host.start("serve")
    _declare(host, 1, SPEC)
    before = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    pid = before["status"]["pid"]

    _restart_server_with_kill_9(host)
    # A label change acknowledged with the same pid proves the new controller adopted the QEMU.
    _declare(host, 2, SPEC, labels={"adopted": "yes"})
    generation = before["metadata"]["generation"] + 1
    adopted = host.wait_vm(PROJECT, "web", runs_generation(generation), what="adopted")
    assert adopted["status"]["pid"] == pid
    assert '"vm_spawned"' not in host.servers["serve"].log_since_last_start()

    os.kill(pid, signal.SIGKILL)

    after = host.wait_vm(
        PROJECT,
        "web",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != pid,
        what="Running again in a new QEMU",
    )
    last_exit = after["status"]["lastExit"]
    assert (last_exit["reason"], last_exit["signal"]) == ("killed-by-signal", 9), json.dumps(after["status"])
    assert after["status"]["restarts"] == before["status"]["restarts"] + 1


def test_a_guest_poweroff_while_no_controller_runs_is_recorded_as_one(make_vm_host: MakeVmHost) -> None:
    """The guest powers off between a controller's kill -9 and the next start: a clean exit."""
    host = make_vm_host()
    host.start("serve")
    spec = {**SPEC, "runStrategy": "RerunOnFailure"}
    _declare(host, 1, spec)
    before = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    pid = before["status"]["pid"]
    run_dir = host.data_dir / "run" / before["metadata"]["uid"]
    # Running means QEMU runs; the guest watches its power button only once it has booted.
    wait_until(
        lambda: GUEST_READY in (run_dir / "serial.log").read_bytes(),
        timeout=GUEST_BOOT_TIMEOUT,
        what="the guest to boot",
    )

    host.servers["serve"].kill()
    _press_power_button(run_dir)
    wait_until(lambda: not is_running_process(pid), timeout=POWEROFF_TIMEOUT, what="the guest to power off")
    host.start("serve")

    after = host.wait_vm(PROJECT, "web", lambda vm: vm["status"]["phase"] == "Stopped", what="web Stopped")
    last_exit = after["status"]["lastExit"]
    assert (last_exit["reason"], last_exit["exitCode"]) == ("guest-poweroff", 0), json.dumps(after["status"])
    assert after["status"]["failures"] == 0


def _press_power_button(run_dir: Path) -> None:
    """QMP system_powerdown through the socket the killed controller no longer holds."""
    directory = os.open(run_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        qmp = Qmp.connect(
            Path(f"/proc/self/fd/{directory}/qmp.sock"), timeout=QMP_TIMEOUT, is_alive=lambda: True
        )
        qmp.execute("system_powerdown")
    finally:
        os.close(directory)
