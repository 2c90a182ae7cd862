"""What every part of hack/chaos shares: its settings, errors, progress notes and number formats."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from _common import percentile

FAULT_KINDS = ("kill", "stop", "rmdir", "rmsock")
# The "VM" of a QEMU whose VM could not be told from its command line and runtime dir.
UNKNOWN_VM = "?"
POLL_S = 0.05
PROC_SCAN_S = 0.25
AUDIT_EVERY_S = 0.5
HTTP_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0
PROCESS_EXIT_TIMEOUT_S = 10.0
# Controller kills land this long (at most) after a fault, while the VM is being recovered.
KILL_AFTER_FAULT_S = 0.5
CONTROLLER_DOWN_MIN_S = 0.2
# Host ports for the VMs' forwards in --spawn mode, apart from the benchmarks' (41000-41999).
SPAWN_PORT_RANGE = "42000-42999"
SPAWN_USER = "chaos"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class ChaosError(RuntimeError):
    """The run could not be made (a server that does not start, VMs that never run)."""


class UsageError(ChaosError):
    """Wrong options or a target the tool must not touch (exit status 2)."""


def note(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def epoch_now() -> float:
    return time.time()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def stats(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": rounded(percentile(values, 50)),
        "p95": rounded(percentile(values, 95)),
        "max": rounded(max(values)) if values else None,
    }
