"""compute_status: phase, conditions and observedGeneration from what was observed. No mocks."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from api.types import Accel, ConditionStatus, Phase, QemuVMStatus
from controller.model import Memory, QmpState
from controller.plan import Intent, Plan
from controller.status import compute_status
from tests.unit.test_plan import HTTP, NOW, desired, observed, process, ready

VM = replace(desired(), generation=3)


def status_for(
    intent: Intent, *, error: str | None = None, previous: QemuVMStatus | None = None, **seen: object
) -> QemuVMStatus:
    return compute_status(
        VM,
        observed(**ready(**seen)),
        Plan(intent, Memory(), detail="why"),
        previous or QemuVMStatus(observed_generation=2),
        accel=Accel.TCG,
        error=error,
        now=NOW,
    )


def conditions(status: QemuVMStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("intent", "qmp", "phase", "ready_reason"),
    [
        pytest.param(Intent.RUNNING, QmpState.RUNNING, Phase.RUNNING, "Running", id="running"),
        pytest.param(Intent.STARTING, QmpState.PAUSED, Phase.STARTING, "Starting", id="starting"),
        pytest.param(Intent.RESTARTING, QmpState.RUNNING, Phase.STOPPING, "Restarting", id="restarting"),
        pytest.param(Intent.BACKING_OFF, None, Phase.CRASH_LOOP_BACK_OFF, "CrashLoopBackOff", id="backoff"),
        pytest.param(Intent.WAITING_FOR_IMAGES, None, Phase.PENDING, "ImageNotFound", id="no-image"),
        pytest.param(Intent.HALTED, None, Phase.STOPPED, "Halted", id="halted"),
        pytest.param(Intent.FINISHED, None, Phase.STOPPED, "Stopped", id="finished"),
        pytest.param(Intent.DELETING, None, Phase.STOPPED, "Deleting", id="deleted-and-stopped"),
    ],
)
def test_phase_and_ready(intent: Intent, qmp: QmpState | None, phase: Phase, ready_reason: str) -> None:
    """Each intent maps to one phase and Ready reason."""
    running = process("d", qmp=qmp) if qmp else None
    status = status_for(intent, process=running)
    assert status.phase is phase
    ready_status = "True" if phase is Phase.RUNNING else "False"
    assert conditions(status)["Ready"] == (ready_status, ready_reason)


def test_running_reports_pid_ports_and_accel() -> None:
    """A running VM shows its pid, start time, accelerator and allocated ports."""
    running = process("d")
    status = status_for(Intent.RUNNING, process=running)
    assert (status.pid, status.accel, status.started_at) == (running.pid, Accel.TCG, running.started_at)
    assert [(p.protocol, p.guest_port, p.host_port) for p in status.ports] == [(*HTTP, 20080)]


def test_observed_generation_moves_only_in_steady_states() -> None:
    """While restarting for a new generation, observedGeneration keeps the old value."""
    assert status_for(Intent.RESTARTING, process=process("d")).observed_generation == 2
    assert status_for(Intent.RUNNING, process=process("d")).observed_generation == 3


def test_error_is_a_condition_and_holds_the_generation() -> None:
    """A failed spawn shows Ready=False with the error, phase Failed, and no generation move."""
    status = status_for(Intent.STARTING, error="qemu exited 1: could not open kernel")
    assert status.phase is Phase.FAILED
    ready_condition = next(c for c in status.conditions if c.type == "Ready")
    assert (ready_condition.reason, ready_condition.message) == (
        "ReconcileError",
        "qemu exited 1: could not open kernel",
    )
    assert conditions(status)["Synced"] == ("False", "ReconcileError")
    assert status.observed_generation == 2


def test_invalid_spec() -> None:
    """An invalid spec is phase Invalid with Valid=False and Synced=False."""
    vm = desired(invalid=True)
    status = compute_status(
        vm, observed(), Plan(Intent.INVALID, Memory()), QemuVMStatus(), accel=None, error=None, now=NOW
    )
    assert status.phase is Phase.INVALID
    assert conditions(status)["Valid"] == ("False", "InvalidSpec")
    assert conditions(status)["Synced"] == ("False", "InvalidSpec")


def test_transition_time_moves_only_when_status_flips() -> None:
    """Recomputing an unchanged status keeps lastTransitionTime; a flip sets it to now."""
    first = status_for(Intent.RUNNING, process=process("d"))
    later = compute_status(
        VM,
        observed(**ready(process=process("d"))),
        Plan(Intent.RUNNING, Memory()),
        first,
        accel=Accel.TCG,
        error=None,
        now=NOW + timedelta(minutes=5),
    )
    assert later == first
    flipped = compute_status(
        VM,
        observed(**ready()),
        Plan(Intent.BACKING_OFF, Memory()),
        later,
        accel=Accel.TCG,
        error=None,
        now=NOW + timedelta(minutes=6),
    )
    ready_condition = next(c for c in flipped.conditions if c.type == "Ready")
    assert (ready_condition.status, ready_condition.last_transition_time) == (
        ConditionStatus.FALSE,
        NOW + timedelta(minutes=6),
    )
