"""How a QEMU exit is classified, and how long a crash loop waits. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta

from api.types import ExitReason, LastExit, RunStrategy
from controller.model import ExitObservation

# A run that lasted this long before failing starts the failure count afresh.
STABLE_RUN_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0


def classify_exit(observed: ExitObservation, *, stop_requested: bool) -> LastExit:
    """Name why the process ended, most specific first.

    A stop the controller asked for is never a failure; a guest that powered itself off is a
    clean exit (QMP told us, or QEMU exited 0 on its own); a signal is a kill; anything else
    is a crash. An exit seen only through /proc (an adopted process) with no code is "vanished".
    """
    message = observed.stderr_tail
    if stop_requested:
        reason = ExitReason.STOPPED_BY_CONTROLLER
    elif observed.guest_shutdown or observed.exit_code == 0:
        reason = ExitReason.GUEST_POWEROFF
    elif observed.signal is not None:
        reason = ExitReason.KILLED
    elif observed.exit_code is not None:
        reason = ExitReason.CRASHED
    else:
        reason = ExitReason.VANISHED
    return LastExit(
        reason=reason, exit_code=observed.exit_code, signal=observed.signal, at=observed.at, message=message
    )


def is_failure(reason: ExitReason) -> bool:
    return reason in (ExitReason.CRASHED, ExitReason.KILLED, ExitReason.VANISHED)


def should_restart(reason: ExitReason, strategy: RunStrategy) -> bool:
    """Whether the run strategy wants the VM back after an exit for `reason`."""
    if strategy is RunStrategy.HALTED:
        return False
    if reason is ExitReason.STOPPED_BY_CONTROLLER:
        return True
    if strategy is RunStrategy.ALWAYS:
        return True
    return is_failure(reason)


def failures_after(previous: int, last_exit: LastExit, started_at: datetime | None) -> int:
    """The consecutive-failure count once `last_exit` is counted."""
    if not is_failure(last_exit.reason):
        return 0
    if started_at is not None and (last_exit.at - started_at).total_seconds() >= STABLE_RUN_SECONDS:
        return 1
    return previous + 1


def crash_backoff(failures: int) -> timedelta:
    """The wait before restarting after `failures` consecutive failures.

    The first failure restarts at once (a single kill -9 recovers immediately); repeats wait
    1 s, 2 s, 4 s ... up to 5 minutes. This applies also to VMs that crashed after reaching
    Running, which KubeVirt's backoff misses.
    """
    if failures <= 1:
        return timedelta(0)
    return timedelta(seconds=min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(failures - 2, 30)))
