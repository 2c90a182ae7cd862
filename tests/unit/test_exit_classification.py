"""classify_exit names why QEMU ended, from what the runtime recorded (controller/exits.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from api.types import ExitReason
from controller.exits import classify_exit
from controller.model import ExitObservation

AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
# What QEMU 7.2 prints on stderr when it catches SIGTERM (checked with the real binary).
POWEROFF, KILLED = ExitReason.GUEST_POWEROFF, ExitReason.KILLED
SIGTERM_LINE = "qemu-system-x86_64: terminating on signal 15 from pid 4242 (pkill)\n"


def observation(
    *, code: int | None = None, sig: int | None = None, guest: bool = False, stderr: str = ""
) -> ExitObservation:
    return ExitObservation(
        at=AT, exit_code=code, signal=sig, guest_shutdown=guest, started_at=None, stderr_tail=stderr
    )


@pytest.mark.parametrize(
    ("seen", "stop_requested", "reason", "signal"),
    [
        pytest.param(observation(code=0, guest=True), False, POWEROFF, None, id="guest-poweroff"),
        pytest.param(observation(code=0), False, POWEROFF, None, id="exit-0-quietly"),
        pytest.param(observation(code=0, stderr=SIGTERM_LINE), False, KILLED, 15, id="sigterm-caught"),
        pytest.param(
            observation(code=0, guest=True, stderr=SIGTERM_LINE), False, POWEROFF, None,
            id="guest-poweroff-wins-over-a-late-signal",
        ),
        pytest.param(
            observation(code=0, stderr=SIGTERM_LINE), True, ExitReason.STOPPED_BY_CONTROLLER, 15,
            id="the-controllers-own-stop",
        ),
        pytest.param(observation(sig=9), False, KILLED, 9, id="sigkill"),
        pytest.param(observation(code=1, stderr=SIGTERM_LINE), False, ExitReason.CRASHED, None, id="crash"),
        pytest.param(observation(), False, ExitReason.VANISHED, None, id="vanished"),
    ],
)  # fmt: skip
def test_classify_exit(
    seen: ExitObservation, stop_requested: bool, reason: ExitReason, signal: int | None
) -> None:
    last = classify_exit(seen, stop_requested=stop_requested)
    assert (last.reason, last.signal) == (reason, signal)
