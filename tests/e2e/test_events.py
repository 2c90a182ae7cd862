"""The event log of one VM's life with real QEMU: boot, kill -9, halt, delete, read from the store.

The API routes that serve events are tested with them; this proves what the server records.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from api.testing.waiting import wait_until
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    VM_WAIT_TIMEOUT,
    ServerProcess,
    VmHost,
    is_running_current,
)

pytestmark = pytest.mark.e2e

PROJECT = "events"
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 2,
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
    "network": {"forwards": [{"guestPort": 80}]},
}
Event = tuple[str, str, str, str | None]


def declare(server: ServerProcess, serial: int, vms: dict[str, dict[str, Any]]) -> None:
    server.declare_vms(PROJECT, serial, vms)


def events_of(host: VmHost, name: str) -> list[Event]:
    rows = host.sql(
        "SELECT type, reason, message, trace_id FROM events WHERE project = ? AND vm_name = ? ORDER BY id",
        PROJECT,
        name,
    )
    return [(str(row[0]), str(row[1]), str(row[2]), row[3]) for row in rows]


def wait_for_events(host: VmHost, name: str, *reasons: str) -> list[Event]:
    """Wait until `reasons` appear in this order (others may come between); return all events."""

    def check() -> list[Event] | None:
        found = events_of(host, name)
        told = iter(reason for _, reason, _, _ in found)
        return found if all(reason in told for reason in reasons) else None

    return wait_until(
        check,
        timeout=VM_WAIT_TIMEOUT,
        what=f"events {', '.join(reasons)} of {name}",
        describe=lambda: "\n".join(map(str, events_of(host, name))),
    )


def test_a_vms_life_is_told_in_its_events(make_vm_host: MakeVmHost) -> None:
    """Created → Scheduled → PortsAllocated → Started; a kill -9 is a Warning ExitDetected, then
    Restarted and Started; a halt is SpecChanged, Stopping, ExitDetected, Stopped; removal is
    Deleting, Deleted. Every event carries a trace id."""
    host = make_vm_host()
    server = host.start("serve")
    declare(server, 1, {"web": SPEC})
    vm = host.wait_vm(PROJECT, "web", is_running_current, what="Running")
    wait_for_events(host, "web", "Created", "Scheduled", "PortsAllocated", "Started")

    os.kill(vm["status"]["pid"], signal.SIGKILL)
    found = wait_for_events(host, "web", "Started", "ExitDetected", "Restarted", "Started")
    kill = next(event for event in found if event[1] == "ExitDetected")
    assert kill[:3] == ("Warning", "ExitDetected", "killed-by-signal (SIGKILL)")
    host.wait_vm(PROJECT, "web", is_running_current, what="Running again")

    declare(server, 2, {"web": {**SPEC, "runStrategy": "Halted"}})
    found = wait_for_events(host, "web", "SpecChanged", "Stopping", "ExitDetected", "Stopped")
    assert ("Normal", "SpecChanged", "generation 2: spec.runStrategy changed (state serial 2)") in [
        event[:3] for event in found
    ]
    assert found[-1][:3] == ("Normal", "Stopped", "stopped: runStrategy is Halted")

    declare(server, 3, {})
    found = wait_for_events(host, "web", "Deleting", "Deleted")
    assert all(trace_id is not None and len(trace_id) == 32 for *_, trace_id in found), found


def test_a_sigterm_qemu_catches_is_a_kill_and_restarts_the_vm(make_vm_host: MakeVmHost) -> None:
    """QEMU exits 0 on SIGTERM; under RerunOnFailure that is still a failure, not a poweroff."""
    host = make_vm_host()
    server = host.start("serve")
    declare(server, 1, {"web": {**SPEC, "runStrategy": "RerunOnFailure"}})
    vm = host.wait_vm(PROJECT, "web", is_running_current, what="Running")

    os.kill(vm["status"]["pid"], signal.SIGTERM)
    found = wait_for_events(host, "web", "Started", "ExitDetected", "Restarted", "Started")
    exit_event = next(event for event in found if event[1] == "ExitDetected")
    assert exit_event[:2] == ("Warning", "ExitDetected")
    assert exit_event[2].startswith("killed-by-signal (exit code 0, SIGTERM): "), exit_event
    assert "terminating on signal 15" in exit_event[2]
    again = host.wait_vm(PROJECT, "web", is_running_current, what="Running again")
    assert again["status"]["lastExit"]["signal"] == signal.SIGTERM
