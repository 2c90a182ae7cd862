"""Fault injection for crash-consistency tests: die like `kill -9` at a named step.

`TOFU_QEMU_CRASH_AT=<point>` makes the controller SIGKILL itself the first time it reaches that
point. Tests restart it without the variable and check that every port, disk and process is
accounted for. Unset (always, in production) a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from enum import StrEnum

CRASH_ENV = "TOFU_QEMU_CRASH_AT"


class CrashPoint(StrEnum):
    AFTER_PORT_ALLOCATION = "after-port-allocation"
    AFTER_DISK_CREATION = "after-disk-creation"
    AFTER_SPAWN = "after-spawn"
    MID_STOP = "mid-stop"
    AFTER_PORT_RELEASE = "after-port-release"
    AFTER_DISK_DELETION = "after-disk-deletion"
    # snapshots (docs/snapshots.md#failure-behaviour): a stopped VM's first disk snapshotted, not
    # the others; every disk snapshotted, no status written; the VM's QEMU killed while its QMP
    # snapshot transaction is in flight (`kill_at`: QEMU dies, not the controller).
    MID_SNAPSHOT = "mid-snapshot"
    AFTER_SNAPSHOT = "after-snapshot"
    QEMU_MID_SNAPSHOT = "qemu-mid-snapshot"


def crash_point(point: CrashPoint) -> None:
    """SIGKILL this process if `point` is the configured one: no cleanup, no flush, like a crash."""
    if os.environ.get(CRASH_ENV) == point.value:
        os.kill(os.getpid(), signal.SIGKILL)


_killed: set[CrashPoint] = set()


def kill_at(point: CrashPoint, pid: int) -> None:
    """SIGKILL process `pid` (not this one) if `point` is the configured one, once per run."""
    if os.environ.get(CRASH_ENV) == point.value and point not in _killed:
        _killed.add(point)
        os.kill(pid, signal.SIGKILL)
