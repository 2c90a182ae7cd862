"""The stop ladder (pure): power button, then `quit` after stopTimeout, then SIGKILL, with a
shorter wait for a guest that cannot answer the button (docs/controller.md#stopping-a-guest).
A VM with a connected guest agent gets `guest-shutdown` first and the power button only after
AGENT_SHUTDOWN_WINDOW (docs/guest-agent.md)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from api.types import QemuVMSpec
from controller.actions import Kill, Quit, RequestGuestShutdown, RequestPowerdown
from controller.model import Memory, ProcessObservation, QmpState
from controller.plan_types import Intent, Plan

# After `system_powerdown` and stopTimeout, `quit` gets this long before SIGKILL.
QUIT_GRACE = timedelta(seconds=5)
# A guest that has not booted (see ProcessObservation.guest_booted) ignores the power button; it
# gets this long to answer it anyway (the tiny guest powers off within 0.2 s), then `quit`.
BOOT_PROBE = timedelta(seconds=2)
# A guest up this long is taken as booted even if no network card ever came up (no virtio-net
# driver, or one that stays promiscuous): cutting its ACPI shutdown to the probe could lose its
# writes, and one still booting after this long gets the full stopTimeout like any other.
BOOT_ASSUMED_AFTER = timedelta(seconds=120)
# QMP may not listen yet just after spawn (the pidfile comes first): wait before calling it hung.
QMP_STARTUP_GRACE = timedelta(seconds=10)
STOP_RECHECK = timedelta(seconds=1)
# guest-shutdown gets this long (at most half of stopTimeout) before the power button is pressed.
AGENT_SHUTDOWN_WINDOW = timedelta(seconds=10)


def stop(
    process: ProcessObservation, memory: Memory, spec: QemuVMSpec, now: datetime, intent: Intent, why: str
) -> Plan:
    timeout = timedelta(seconds=spec.stop_timeout)
    return stop_process(process, memory, timeout, now, intent, why, agent=spec.guest_agent)


def stop_process(
    process: ProcessObservation,
    memory: Memory,
    stop_timeout: timedelta | None,
    now: datetime,
    intent: Intent,
    why: str,
    *,
    agent: bool = False,
) -> Plan:
    """Graceful stop across reconciles: power button, then `quit` after stopTimeout, then SIGKILL.

    The start of the stop is remembered in status, so a controller restart mid-stop continues
    where it was instead of starting over. A process that does not answer QMP is killed at once.
    A guest that cannot answer the power button gets less than stopTimeout (`_answer_window`).
    """
    timeout = stop_timeout if stop_timeout is not None else timedelta(seconds=30)
    requested = memory.stop_requested_at
    if process.qmp is QmpState.UNREACHABLE and now - process.started_at >= QMP_STARTUP_GRACE:
        # No QMP: the power button cannot be pressed. A process asked to stop may just be
        # closing its socket on the way out, so it gets the quit grace; a hung one goes now.
        if requested is not None and now - requested < QUIT_GRACE:
            return Plan(intent, memory, requeue_after=QUIT_GRACE - (now - requested), detail=why)
        return kill(process, memory, intent, why)
    window, no_answer = _answer_window(process, timeout, now)
    if no_answer:
        why = f"{why}; {no_answer}"
    if requested is None:
        memory = replace(memory, stop_requested_at=now)
        if not window:
            return Plan(intent, memory, (Quit(),), requeue_after=QUIT_GRACE, detail=why)
        if agent and process.agent_connected:
            first = _agent_window(window)
            return Plan(intent, memory, (RequestGuestShutdown(),), requeue_after=first, detail=why)
        return Plan(intent, memory, (RequestPowerdown(),), requeue_after=window, detail=why)
    elapsed = now - requested
    if agent and elapsed < _agent_window(window):
        return Plan(intent, memory, requeue_after=_agent_window(window) - elapsed, detail=why)
    if agent and elapsed < window and process.qmp is not QmpState.SHUTDOWN:
        # guest-shutdown did not end it (or was never sent): the power button, then the rest.
        return Plan(intent, memory, (RequestPowerdown(),), requeue_after=window - elapsed, detail=why)
    if elapsed < window:
        return Plan(intent, memory, requeue_after=window - elapsed, detail=why)
    if elapsed < window + QUIT_GRACE:
        if process.qmp is QmpState.SHUTDOWN:
            # It announced its shutdown (the power button worked, or the quit of an earlier
            # pass is under way): it is on its way out and gets the grace, not another quit.
            return Plan(intent, memory, requeue_after=window + QUIT_GRACE - elapsed, detail=why)
        return Plan(intent, memory, (Quit(),), requeue_after=window + QUIT_GRACE - elapsed, detail=why)
    return kill(process, memory, intent, why)


def _agent_window(window: timedelta) -> timedelta:
    return min(AGENT_SHUTDOWN_WINDOW, window / 2)


def _answer_window(process: ProcessObservation, timeout: timedelta, now: datetime) -> tuple[timedelta, str]:
    """How long the guest gets to power off after the power button, and why it is short.

    A paused guest runs no code, so it cannot answer: `quit` at once. A guest that has not
    booted yet ignores the button: it gets BOOT_PROBE to answer anyway, then `quit`.
    """
    if process.qmp in (QmpState.PAUSED, QmpState.PRELAUNCH):
        return timedelta(0), "the guest is paused and cannot answer the power button: quit"
    booting = not process.guest_booted and now - process.started_at < BOOT_ASSUMED_AFTER
    if booting and timeout > BOOT_PROBE:
        probe = BOOT_PROBE.total_seconds()
        return (
            BOOT_PROBE,
            f"the guest has not booted (no network card up): quit unless it powers off within {probe:g} s",
        )
    return timeout, ""


def kill(process: ProcessObservation, memory: Memory, intent: Intent, why: str) -> Plan:
    """SIGKILL, then look again shortly: the pidfd records the exit when it comes."""
    return Plan(intent, memory, (Kill(process.pid),), requeue_after=STOP_RECHECK, detail=why)
