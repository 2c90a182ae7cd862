"""plan() under imperative requests (stop, start, restart): they act on the VM without the spec
changing, and a restart the user asked for is counted in `restarts`."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from api.store.vms import RunAction, next_override
from api.types import ExitReason, RunOverride
from controller.actions import RequestPowerdown, Spawn
from controller.model import Desired, Memory
from controller.plan import Intent, plan
from tests.unit.test_plan import CONTEXT, NOW, desired, digest_for, exited, kinds, observed, process, ready

VM = desired()
DIGEST = digest_for(VM)


def requested(action: RunAction, at: datetime, current: RunOverride | None = None) -> RunOverride:
    return next_override(current, action, by="alice", now=at)


def with_override(override: RunOverride, vm: Desired = VM) -> Desired:
    return replace(vm, override=override)


def test_stop_request_stops_a_running_vm_and_keeps_it_stopped() -> None:
    stop = requested(RunAction.STOP, NOW)
    running = plan(
        with_override(stop), observed(**ready(process=process(DIGEST))), Memory(), CONTEXT, now=NOW
    )
    assert (running.intent, kinds(running)) == (Intent.STOPPING, [RequestPowerdown])
    assert running.detail == "stopped by request of alice"
    stopped = plan(with_override(stop), observed(**ready()), Memory(), CONTEXT, now=NOW)
    assert (stopped.intent, stopped.actions) == (Intent.HALTED, ())


def test_start_request_lifts_the_stop() -> None:
    start = requested(RunAction.START, NOW, requested(RunAction.STOP, NOW - timedelta(minutes=5)))
    assert start.stopped is False
    result = plan(with_override(start), observed(**ready()), Memory(), CONTEXT, now=NOW)
    assert kinds(result) == [Spawn]


def test_restart_request_restarts_only_a_qemu_started_before_it() -> None:
    restart = requested(RunAction.RESTART, NOW - timedelta(seconds=10))
    older = process(DIGEST, age=60)
    result = plan(with_override(restart), observed(**ready(process=older)), Memory(), CONTEXT, now=NOW)
    assert (result.intent, kinds(result)) == (Intent.RESTARTING, [RequestPowerdown])
    assert result.detail == "restart requested by alice"
    newer = process(DIGEST, age=5)
    assert plan(
        with_override(restart), observed(**ready(process=newer)), Memory(), CONTEXT, now=NOW
    ).intent is (Intent.RUNNING)


def test_the_requested_restart_is_counted_once_and_other_controller_stops_are_not() -> None:
    restart_at = NOW - timedelta(seconds=3)
    vm = with_override(requested(RunAction.RESTART, restart_at))
    stop_begun = Memory(stop_requested_at=restart_at + timedelta(milliseconds=1))
    # The QEMU that ran when the restart was asked for has exited (ran 60 s, ended 1 s ago).
    seen = observed(**ready(exit=exited(code=0, ago=1, ran=60), has_stale_runtime=True))
    result = plan(vm, seen, stop_begun, CONTEXT, now=NOW)
    assert kinds(result) == [Spawn]
    assert result.memory.last_exit is not None
    assert result.memory.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER
    assert result.memory.restarts == 1
    # A later spec-change restart (a process started after the request) does not count.
    later = observed(**ready(exit=exited(code=0, ago=0.5, ran=2), has_stale_runtime=True))
    again = plan(
        vm, later, replace(result.memory, stop_requested_at=NOW - timedelta(seconds=1)), CONTEXT, now=NOW
    )
    assert again.memory.restarts == 1


def test_restart_request_skips_the_crash_loop_backoff() -> None:
    crashed = exited(sig=9, ago=2)
    backing_off = Memory(failures=5, next_retry_at=NOW + timedelta(minutes=2))
    seen = observed(**ready(exit=crashed, has_stale_runtime=True))
    assert plan(VM, seen, backing_off, CONTEXT, now=NOW).intent is Intent.BACKING_OFF
    kicked = with_override(requested(RunAction.RESTART, NOW - timedelta(seconds=1)))
    assert kinds(plan(kicked, seen, backing_off, CONTEXT, now=NOW)) == [Spawn]


def test_restart_request_starts_a_guest_that_powered_off_under_rerun_on_failure() -> None:
    vm = desired(runStrategy="RerunOnFailure")
    seen = observed(**ready(exit=exited(code=0, ago=30), has_stale_runtime=True))
    assert plan(vm, seen, Memory(), CONTEXT, now=NOW).intent is Intent.FINISHED
    kicked = with_override(requested(RunAction.RESTART, NOW), vm)
    assert kinds(plan(kicked, seen, Memory(), CONTEXT, now=NOW)) == [Spawn]
