"""compute_status(...) -> QemuVMStatus: what the API shows for one VM. Pure.

Status is recomputed on every reconcile from what was observed after acting, the plan's intent
and memory, and any error; the reconciler writes it only when it differs from the stored one.
`observedGeneration` moves only once the observed VM reflects the generation (a steady intent),
so "Running at observedGeneration N" always means the process runs spec N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from api.types import (
    Accel,
    AllocatedPort,
    Condition,
    ConditionStatus,
    Phase,
    QemuVMStatus,
)
from controller.model import Desired, Observed, QmpState
from controller.plan import Intent, Plan

STEADY_INTENTS = frozenset({Intent.RUNNING, Intent.PAUSED, Intent.HALTED, Intent.FINISHED, Intent.INVALID})
# Intents that leave a running guest running: it stays Running and Ready while they wait.
_KEEPS_RUNNING = frozenset({Intent.REFUSED, Intent.WAITING_FOR_IMAGES, Intent.INSUFFICIENT_STORAGE})
_PHASES = {
    Intent.INVALID: Phase.INVALID,
    Intent.DELETING: Phase.STOPPING,
    Intent.STOPPING: Phase.STOPPING,
    Intent.RESTARTING: Phase.STOPPING,
    Intent.HALTED: Phase.STOPPED,
    Intent.FINISHED: Phase.STOPPED,
    Intent.SHUTTING_DOWN: Phase.STOPPING,
    Intent.REFUSED: Phase.FAILED,
    Intent.PREPARING: Phase.PENDING,
    Intent.WAITING_FOR_IMAGES: Phase.PENDING,
    Intent.QUOTA_EXCEEDED: Phase.PENDING,
    Intent.HOST_MEMORY_LOW: Phase.PENDING,
    Intent.INSUFFICIENT_STORAGE: Phase.PENDING,
    Intent.BACKING_OFF: Phase.CRASH_LOOP_BACK_OFF,
    Intent.STARTING: Phase.STARTING,
    Intent.RUNNING: Phase.RUNNING,
    Intent.PAUSED: Phase.PAUSED,
}


def compute_status(
    desired: Desired,
    observed: Observed,
    result: Plan,
    previous: QemuVMStatus,
    *,
    accel: Accel | None,
    error: str | None,
    now: datetime,
) -> QemuVMStatus:
    """The status to store after one reconcile of `desired`."""
    if result.intent is Intent.ADOPTING:
        # Only bookkeeping ran (attach, record an exit); the next reconcile decides, at once.
        return previous
    process = observed.process
    running = process is not None and process.qmp is QmpState.RUNNING
    if result.intent is Intent.STARTING and running and error is None:
        # The spawn sent `cont` and the look after acting saw the guest run: the start is done.
        # Status says now what the pass after it will see, which then writes nothing.
        result = replace(result, intent=Intent.RUNNING)
    phase = _PHASES[result.intent]
    if error is not None and phase is Phase.STARTING and process is None:
        phase = Phase.FAILED
    if result.intent in (Intent.DELETING, Intent.SHUTTING_DOWN) and process is None:
        phase = Phase.STOPPED
    if result.intent in _KEEPS_RUNNING and running:
        phase = Phase.RUNNING
    memory = result.memory
    verdicts = (
        _valid(desired),
        _admitted(result),
        _ready(result, running, error),
        _synced(desired, result, error),
    )
    observed_generation = (
        desired.generation
        if error is None and result.intent in STEADY_INTENTS
        else previous.observed_generation
    )
    return QemuVMStatus(
        phase=phase,
        conditions=tuple(_to_condition(v, previous.conditions, now) for v in verdicts),
        observed_generation=observed_generation,
        pid=process.pid if process else None,
        accel=accel if process else None,
        ports=tuple(
            AllocatedPort(protocol=protocol, guest_port=guest_port, host_port=host_port)
            for (protocol, guest_port), host_port in sorted(observed.ports.items())
        ),
        restarts=memory.restarts,
        failures=memory.failures,
        started_at=process.started_at if process else None,
        last_exit=memory.last_exit,
        next_retry_at=memory.next_retry_at if result.intent is Intent.BACKING_OFF else None,
        stop_requested_at=memory.stop_requested_at,
        paused_since=memory.paused_since if process else None,
        guest=observed.guest if process else None,
    )


@dataclass(frozen=True, slots=True)
class _Verdict:
    type: str
    ok: bool
    reason: str
    message: str = ""


def _condition(type_: str, ok: bool, reason: str, message: str = "") -> _Verdict:
    return _Verdict(type_, ok, reason, message)


def _valid(desired: Desired) -> _Verdict:
    if desired.spec_error is not None:
        return _condition("Valid", False, "InvalidSpec", desired.spec_error)
    if desired.admission.invalid_spec:
        return _condition("Valid", False, "InvalidSpec", desired.admission.message)
    return _condition("Valid", True, "SpecAccepted")


def _admitted(result: Plan) -> _Verdict:
    if result.intent in (Intent.QUOTA_EXCEEDED, Intent.HOST_MEMORY_LOW, Intent.INSUFFICIENT_STORAGE):
        return _condition("Admitted", False, result.intent.value, result.detail)
    return _condition("Admitted", True, "Admitted")


def _ready(result: Plan, running: bool, error: str | None) -> _Verdict:
    if error is not None:
        return _condition("Ready", False, "ReconcileError", error)
    if running and (result.intent is Intent.RUNNING or result.intent in _KEEPS_RUNNING):
        return _condition("Ready", True, "Running")
    reasons = {
        Intent.WAITING_FOR_IMAGES: "ImageNotFound",
        Intent.BACKING_OFF: "CrashLoopBackOff",
        Intent.FINISHED: "Stopped",
        Intent.HALTED: "Halted",
    }
    reason = result.reason or reasons.get(result.intent, result.intent.value)
    return _condition("Ready", False, reason, result.detail)


def _synced(desired: Desired, result: Plan, error: str | None) -> _Verdict:
    if error is not None:
        return _condition("Synced", False, "ReconcileError", error)
    if desired.spec is None or desired.admission.invalid_spec:
        return _condition("Synced", False, "InvalidSpec", "the last valid spec keeps running")
    if result.intent in STEADY_INTENTS:
        return _condition("Synced", True, "UpToDate")
    return _condition("Synced", False, result.reason or result.intent.value, result.detail)


def _to_condition(verdict: _Verdict, previous: tuple[Condition, ...], now: datetime) -> Condition:
    """A condition whose lastTransitionTime moves only when its status flips."""
    status = ConditionStatus.TRUE if verdict.ok else ConditionStatus.FALSE
    old = next((c for c in previous if c.type == verdict.type), None)
    changed_at = old.last_transition_time if old is not None and old.status == status else now
    return Condition(
        type=verdict.type,
        status=status,
        reason=verdict.reason,
        message=verdict.message,
        last_transition_time=changed_at,
    )
