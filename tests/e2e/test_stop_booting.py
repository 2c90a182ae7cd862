"""Stopping a guest that has not booted does not wait its stopTimeout; a booted guest gets the
power button and all the time it needs (docs/controller.md, "Stopping a guest")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    VmHost,
    is_running_current,
)

pytestmark = pytest.mark.e2e

PROJECT = "stopping"
# Far beyond every wait below: a stop that waited for it would fail the test.
STOP_TIMEOUT = 600
# No initramfs, so no network card driver and no power button driver, and the kernel waits
# `rootdelay` seconds before it even looks for a root disk: a guest that is still booting.
BOOTING = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": STOP_TIMEOUT,
    "boot": {"kernel": "tiny-guest/vmlinuz", "cmdline": f"rootdelay={STOP_TIMEOUT}"},
}
BOOTED = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": STOP_TIMEOUT,
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
}
GUEST_READY = b"TOFU-GUEST-READY"


def _declare(host: VmHost, serial: int, spec: dict[str, Any]) -> None:
    answer = host.servers["serve"].request(
        "POST", f"/state/{PROJECT}", body=encode(vm_state(serial, {"web": spec}))
    )
    assert answer.status == 200, answer.body


def _stopping_messages(host: VmHost) -> list[str]:
    rows = host.sql(
        "SELECT message FROM events WHERE project = ? AND vm_name = ? AND reason = 'Stopping' ORDER BY id",
        PROJECT,
        "web",
    )
    return [str(row[0]) for row in rows]


def _is_stopped(vm: dict[str, Any]) -> bool:
    return bool(vm["status"]["phase"] == "Stopped")


def test_a_guest_still_booting_is_quit_after_the_probe(make_vm_host: MakeVmHost) -> None:
    host = make_vm_host()
    host.start("serve")
    _declare(host, 1, BOOTING)
    host.wait_vm(PROJECT, "web", is_running_current, what="web Running (QEMU runs, the guest boots)")

    _declare(host, 2, {**BOOTING, "runStrategy": "Halted"})

    stopped = host.wait_vm(PROJECT, "web", _is_stopped, what=f"web Stopped, well before {STOP_TIMEOUT} s")
    assert stopped["status"]["lastExit"]["reason"] == "stopped-by-controller", json.dumps(stopped["status"])
    messages = _stopping_messages(host)
    assert len(messages) == 2, messages
    assert messages[0].startswith("power button pressed: runStrategy is Halted; the guest has not booted")
    assert messages[1].startswith("QEMU told to quit: runStrategy is Halted; the guest has not booted")


def test_a_booted_guest_gets_the_power_button_also_after_adoption(make_vm_host: MakeVmHost) -> None:
    """The controller learns that the guest booted from QMP; a restarted one asks QEMU."""
    host = make_vm_host()
    host.start("serve")
    _declare(host, 1, BOOTED)
    running = host.wait_vm(PROJECT, "web", is_running_current, what="web Running")
    serial_log = host.data_dir / "run" / running["metadata"]["uid"] / "serial.log"
    wait_until(
        lambda: GUEST_READY in serial_log.read_bytes(), timeout=GUEST_BOOT_TIMEOUT, what="the guest to boot"
    )
    host.servers["serve"].kill()
    host.start("serve")

    _declare(host, 2, {**BOOTED, "runStrategy": "Halted"})

    stopped = host.wait_vm(PROJECT, "web", _is_stopped, what="web Stopped by its guest")
    assert stopped["status"]["lastExit"]["reason"] == "stopped-by-controller", json.dumps(stopped["status"])
    assert _stopping_messages(host) == ["power button pressed: runStrategy is Halted"]
    assert '"reason": "guest-shutdown"' in host.servers["serve"].log_since_last_start()
