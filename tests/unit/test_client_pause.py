"""`tofu-qemu get` and `describe` of a paused VM, against golden files (tests/unit/golden/)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from api.client.describe import describe_vm
from api.client.format import vm_table
from tests.unit.test_client_format import NOW, check_golden, condition, stamp, vm


def paused(name: str, reason: str, message: str, **status: Any) -> dict[str, Any]:
    return vm(
        name,
        "lab",
        "Paused",
        pid=4243,
        accel="tcg",
        startedAt=stamp(timedelta(minutes=20)),
        pausedSince=stamp(timedelta(minutes=2)),
        conditions=[
            condition("Valid", "True", "SpecAccepted", "", stamp(timedelta(hours=3))),
            condition("Ready", "False", reason, message, stamp(timedelta(minutes=2))),
        ],
        **status,
    )


BY_REQUEST = paused(
    "web-02",
    "PausedByRequest",
    "paused at the request of alice",
    override={
        "stopped": False,
        "restartRequestedAt": None,
        "pauseRequestedAt": stamp(timedelta(minutes=2, seconds=1)),
        "unpauseRequestedAt": None,
        "requestedBy": "alice",
        "updatedAt": stamp(timedelta(minutes=2, seconds=1)),
    },
)
OUTSIDE = paused(
    "web-03",
    "PausedOutside",
    "paused from outside tofu-qemu (a QMP stop, or QEMU itself); `tofu-qemu unpause` continues it",
)
EVENTS = [
    {"time": stamp(timedelta(minutes=2, seconds=1)), "type": "Normal", "reason": "PauseRequested",
     "message": "pause requested by alice"},
    {"time": stamp(timedelta(minutes=2)), "type": "Normal", "reason": "Paused",
     "message": "pausing at the request of alice"},
]  # fmt: skip


def test_get_shows_paused_vms_not_ready_with_their_pid() -> None:
    check_golden("get-vms-paused.txt", vm_table([BY_REQUEST, OUTSIDE], NOW))


def test_describe_a_paused_vm_tells_who_paused_it() -> None:
    check_golden("describe-vm-paused.txt", describe_vm(BY_REQUEST, EVENTS, NOW))
