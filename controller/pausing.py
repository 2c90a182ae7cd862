"""What plan() does with the run state of a live QEMU: pause, unpause, or continue it. Pure.

A pause belongs to the QEMU that ran when it was asked for (`RunOverride.pause_requested_at`),
as in KubeVirt, where it belongs to the VMI: a QEMU started after it (a crash restart, a
restart, a spec change) runs. A controller restart keeps it, since the QEMU is the same.

Three paused states are told apart:
- PRELAUNCH: the controller started QEMU with -S; it `cont`s it, unless a pause applies or the
  spec's startStrategy is Paused (then every QEMU of the VM waits for an unpause, as KubeVirt's).
- PAUSED with a pause asked for: held, and `Paused` by request.
- PAUSED without one: paused from outside (someone's QMP `stop`, or QEMU itself on an I/O error
  or a watchdog). The controller does not fight it: it shows it and leaves it, until an unpause
  asked after it was first seen paused (`Memory.paused_since`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from api.types import QemuVMSpec, StartStrategy
from controller.actions import Action, Continue, Pause, Unpause
from controller.model import Desired, Memory, ProcessObservation, QmpState

PAUSED_BY_REQUEST = "PausedByRequest"
PAUSED_OUTSIDE = "PausedOutside"
STARTED_PAUSED = "StartedPaused"


@dataclass(frozen=True, slots=True)
class RunStateStep:
    """What plan() turns into a Plan: its intent (plan.Intent's values), memory and actions."""

    intent: Literal["Paused", "Starting", "Running"]
    memory: Memory
    actions: tuple[Action, ...] = ()
    detail: str = ""
    reason: str = ""

    @property
    def again(self) -> bool:
        """Acting changed the run state: the next step is decided from a fresh look."""
        return bool(self.actions)


def resumes_at_spawn(spec: QemuVMSpec) -> bool:
    """Whether a QEMU about to be spawned is to run at once. Neither a pause nor an unpause
    asked before it started applies to it (`pause_wanted`, `held_at_start`), so only the
    startStrategy decides."""
    return spec.start_strategy is not StartStrategy.PAUSED


def pause_wanted(desired: Desired, process: ProcessObservation) -> bool:
    """A pause was asked for after this QEMU started (and not lifted since)."""
    asked = desired.pause_requested_at
    return asked is not None and process.started_at < asked


def held_at_start(desired: Desired, spec: QemuVMSpec, process: ProcessObservation) -> bool:
    """startStrategy Paused, and no unpause asked since this QEMU started."""
    unpause = desired.unpause_requested_at
    unpaused = unpause is not None and unpause > process.started_at
    return spec.start_strategy is StartStrategy.PAUSED and not unpaused


def run_state_step(
    desired: Desired, spec: QemuVMSpec, process: ProcessObservation, memory: Memory, *, now: datetime
) -> RunStateStep | None:
    """The step for a live QEMU's run state, or None when it runs as it should (the caller
    then keeps it running, with `paused_since` cleared)."""
    wanted = pause_wanted(desired, process)
    by = _requester(desired)
    if process.qmp is QmpState.RUNNING:
        if not wanted:
            return None
        # Remembered before the `stop`: an unpause asked a moment later must still apply.
        memory = replace(memory, paused_since=now)
        return RunStateStep("Paused", memory, (Pause(),), detail=f"pausing at the request of {by}")
    if process.qmp is QmpState.PRELAUNCH and not wanted:
        if held_at_start(desired, spec, process):
            detail = "started paused (startStrategy Paused); `tofu-qemu unpause` continues it"
            return RunStateStep("Paused", memory, detail=detail, reason=STARTED_PAUSED)
        return RunStateStep("Starting", replace(memory, paused_since=None), (Continue(),))
    if process.qmp not in (QmpState.PAUSED, QmpState.PRELAUNCH):
        return None
    since = memory.paused_since
    if since is None or since < process.started_at:
        since = now  # first seen paused (a stale mark was left by an earlier QEMU)
    memory = replace(memory, paused_since=since)
    if wanted:
        detail = f"paused at the request of {by}"
        return RunStateStep("Paused", memory, detail=detail, reason=PAUSED_BY_REQUEST)
    unpause = desired.unpause_requested_at
    if unpause is not None and unpause >= since:
        memory = replace(memory, paused_since=None)
        return RunStateStep("Running", memory, (Unpause(),), detail=f"unpaused at the request of {by}")
    detail = "paused from outside tofu-qemu (a QMP stop, or QEMU itself); `tofu-qemu unpause` continues it"
    return RunStateStep("Paused", memory, detail=detail, reason=PAUSED_OUTSIDE)


def _requester(desired: Desired) -> str:
    by = desired.override.requested_by if desired.override is not None else ""
    return by or "an API client"
