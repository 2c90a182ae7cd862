"""How a QEMU exit is classified, and how long a crash loop waits. Pure."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from api.types import ExitReason, LastExit, RunStrategy
from controller.model import Desired, ExitObservation, Memory, Observed

# A run that lasted this long before failing starts the failure count afresh.
STABLE_RUN_SECONDS = 60.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 300.0
# QEMU catches SIGTERM, SIGINT and SIGHUP, says so on stderr and exits 0 as if powered off:
# "qemu-system-x86_64: terminating on signal 15 from pid 4242 (pkill)".
_TERMINATED_BY_SIGNAL = re.compile(r"terminating on signal (\d+)")


def classify_exit(observed: ExitObservation, *, stop_requested: bool) -> LastExit:
    """Name why the process ended, most specific first.

    A stop the controller asked for is never a failure; a guest that powered itself off is a
    clean exit (QMP told us, or QEMU exited 0 on its own); a signal is a kill, also one QEMU
    caught and exited 0 for; anything else is a crash. An exit seen only through /proc (an
    adopted process) with no code is "vanished".
    """
    message = observed.stderr_tail
    caught = _caught_signal(observed)
    signal = observed.signal if caught is None else caught
    if stop_requested:
        reason = ExitReason.STOPPED_BY_CONTROLLER
    elif caught is not None:
        reason = ExitReason.KILLED
    elif observed.guest_shutdown or observed.exit_code == 0:
        reason = ExitReason.GUEST_POWEROFF
    elif observed.signal is not None:
        reason = ExitReason.KILLED
    elif observed.exit_code is not None:
        reason = ExitReason.CRASHED
    else:
        reason = ExitReason.VANISHED
    code = observed.exit_code
    return LastExit(reason=reason, exit_code=code, signal=signal, at=observed.at, message=message)


def _caught_signal(observed: ExitObservation) -> int | None:
    """The signal QEMU reported it terminated on, when it exited 0 for it and not for the guest."""
    if observed.exit_code != 0 or observed.guest_shutdown:
        return None
    found = _TERMINATED_BY_SIGNAL.findall(observed.stderr_tail)
    return int(found[-1]) if found else None


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


def absorb_exit(memory: Memory, observed: Observed, desired: Desired | None) -> Memory:
    """Fold a newly recorded exit into memory: last exit, failure count and next retry time.

    Idempotent: an exit already folded in (same time) changes nothing.
    """
    exit_ = observed.exit
    if exit_ is None:
        # Also while the process is exiting: the stop request must survive until the exit is
        # recorded, or a controller-requested stop would be counted as the guest's own poweroff.
        return memory
    if memory.last_exit is not None and memory.last_exit.at >= exit_.at:
        return memory
    last_exit = classify_exit(exit_, stop_requested=memory.stop_requested_at is not None)
    failures = failures_after(memory.failures, last_exit, exit_.started_at)
    retry_at = exit_.at + crash_backoff(failures) if is_failure(last_exit.reason) else None
    return Memory(
        restarts=memory.restarts + int(leads_to_restart(exit_, last_exit, desired)),
        failures=failures,
        last_exit=last_exit,
        next_retry_at=retry_at,
        stop_requested_at=None,
    )


def leads_to_restart(exit_: ExitObservation, last_exit: LastExit, desired: Desired | None) -> bool:
    """Whether the VM is to start again after this exit. Counted in `restarts` as the exit is
    folded in, so the count is stored with the exit, before the start that follows it."""
    if desired is None or desired.deleting or desired.spec is None or desired.stopped_by_request:
        return False
    if ended_by_requested_restart(exit_, desired.restart_requested_at):
        return True
    return last_exit.reason is not ExitReason.STOPPED_BY_CONTROLLER and should_restart(
        last_exit.reason, desired.spec.run_strategy
    )


def ended_by_requested_restart(exit_: ExitObservation, restart_at: datetime | None) -> bool:
    """The process that just exited is the one a restart request was for: it started before the
    request and ended after it. A restart the user asked for counts in `restarts`."""
    if restart_at is None or exit_.started_at is None:
        return False
    return exit_.started_at < restart_at <= exit_.at
