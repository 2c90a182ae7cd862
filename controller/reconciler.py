"""Reconcile one VM: read desired, observe, plan, execute, re-observe, write status if changed.

Called with a uid only (level-triggered): it reads the world fresh every time and never
branches on what triggered it. Status is written even when acting failed, so the failure
becomes a condition the user can see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from enum import StrEnum
from typing import Protocol

import structlog
from opentelemetry import trace
from opentelemetry.trace import Span
from pydantic import ValidationError

from api.store.allocations import Allocations
from api.store.events import EventType, NewEvent
from api.store.status_writer import StatusConflict, VMStatusWriter
from api.store.vms import VMRecord
from api.telemetry.tracing import span_context_of
from api.types import Accel, Phase, QemuVMSpec, QemuVMStatus
from controller.actions import Action, Finalize, Spawn
from controller.clock import Clock
from controller.errors import TerminalError, TransientError
from controller.events import VMEvent, events_for
from controller.executor import Executor
from controller.layout import DataLayout
from controller.model import Desired, Memory, Observed
from controller.observe import ImageLookups, observe
from controller.plan import LaunchContext, Plan, plan
from controller.qemu.accel import AccelResolver
from controller.qemu.runtime import Runtime
from controller.quota_gate import QuotaGate
from controller.status import compute_status
from controller.telemetry import BootSpans

log = structlog.get_logger(__name__)
# Steps that feed each other (ports and disks, spawn, continue) run in one reconcile.
MAX_ROUNDS = 6


class EventRecorder(Protocol):
    """Where a reconcile's events go (api/store/events.py EventLog)."""

    async def record(self, *events: NewEvent) -> None: ...


class _NoEvents:
    async def record(self, *events: NewEvent) -> None:
        return None


class Outcome(StrEnum):
    SUCCESS = "success"
    REQUEUE = "requeue"
    TRANSIENT_ERROR = "error"
    TERMINAL_ERROR = "terminal"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    requeue_after: timedelta | None = None
    error: str | None = None


def desired_from(record: VMRecord | None) -> Desired | None:
    if record is None:
        return None
    spec: QemuVMSpec | None = None
    spec_error = record.spec_error
    if spec_error is None:
        try:
            spec = QemuVMSpec.model_validate(record.spec)
        except ValidationError as err:
            spec_error = f"stored spec no longer validates: {err.error_count()} error(s)"
    return Desired(
        uid=record.uid,
        project=record.project,
        name=record.name,
        generation=record.generation,
        spec=spec,
        spec_error=spec_error,
        deleting=record.deleted_at is not None,
        override=record.run_override,
    )


def memory_from(status: QemuVMStatus) -> Memory:
    return Memory(
        restarts=status.restarts,
        failures=status.failures,
        last_exit=status.last_exit,
        next_retry_at=status.next_retry_at,
        stop_requested_at=status.stop_requested_at,
    )


class Reconciler:
    def __init__(
        self,
        *,
        objects: VMStatusWriter,
        allocations: Allocations,
        runtime: Runtime,
        executor: Executor,
        accel: AccelResolver,
        layout: DataLayout,
        clock: Clock,
        boots: BootSpans,
        quotas: QuotaGate,
        memory_reserve_mib: int = 0,
        storage_reserve_mib: int = 0,
        liveness_period: timedelta | None = None,
        forward_address: str = "127.0.0.1",
        images: ImageLookups | None = None,
        shutting_down: Callable[[], bool] = lambda: False,
        restarted: Callable[[str], None] = lambda _reason: None,
        events: EventRecorder | None = None,
    ) -> None:
        """`restarted(reason)` is told of every restart, with the exit reason that caused it;
        `shutting_down()` says whether the controller is stopping every VM before it exits;
        `events` gets what each reconcile did, as the VM's events."""
        self._events = events or _NoEvents()
        self._forward_address = forward_address
        self._images = images
        self._shutting_down = shutting_down
        self._boots = boots
        self._quotas = quotas
        self._memory_reserve_mib = memory_reserve_mib
        self._storage_reserve_mib = storage_reserve_mib
        self._liveness_period = liveness_period
        self._restarted = restarted
        self._objects = objects
        self._allocations = allocations
        self._runtime = runtime
        self._executor = executor
        self._accel = accel
        self._layout = layout
        self._clock = clock

    async def reconcile(self, uid: str) -> Result:
        """Converge `uid` once; the current span (the reconcile's root) gets what was seen and done.

        Log lines inside name the VM's project and name too (the caller binds its uid).
        """
        record = await self._objects.get(uid)
        names = {"project": record.project, "vm": record.name} if record is not None else {}
        with structlog.contextvars.bound_contextvars(**names):
            return await self._converge(uid, record)

    async def _converge(self, uid: str, record: VMRecord | None) -> Result:
        span = trace.get_current_span()
        desired = desired_from(record)
        if desired is not None and desired.spec is not None and not desired.deleting:
            desired = replace(desired, admission=await self._quotas.admission(uid, desired.generation))
        paths = self._layout.runtime(uid)
        spec = desired.spec if desired else None
        accel = await self._accel.resolve(spec.accel) if spec else Accel.TCG
        context = LaunchContext(
            accel=accel,
            runtime=paths,
            images_dir=self._layout.images_dir,
            disks_dir=self._layout.disks_dir(uid),
            memory_reserve_mib=self._memory_reserve_mib,
            storage_reserve_mib=self._storage_reserve_mib,
            liveness_period=self._liveness_period,
            forward_address=self._forward_address,
            shutting_down=self._shutting_down(),
        )
        previous = QemuVMStatus.model_validate(record.status) if record and record.status else QemuVMStatus()
        _describe(span, record, previous)
        memory = memory_from(previous)
        restarts_before = previous.restarts
        planned: list[str] = []
        error: str | None = None
        outcome = Outcome.SUCCESS
        finalized = False
        # Actions that ran since the last status computed, and the events of the steps before.
        executed: list[Action] = []
        events: list[VMEvent] = []
        current: Plan | None = None
        observed: Observed | None = None
        for _ in range(MAX_ROUNDS):
            observed = await self._observe(uid, spec, expect_process=previous.pid is not None)
            current = plan(desired, observed, memory, context, now=self._clock.now())
            planned += [type(action).__name__ for action in current.actions]
            if desired is not None and current.memory != memory and _spawns(current):
                # Spawning clears the exit record this memory was folded from: store the count
                # first, or a controller killed right after the spawn would lose the exit.
                stored = compute_status(
                    desired, observed, current, previous, accel=accel, error=None, now=self._clock.now()
                )
                # An exit noticed before this spawn is told before it: a step ends here.
                events += events_for(desired, previous, stored, executed, None)
                previous, executed = stored, []
                await self._write_status(uid, previous)
            memory = current.memory
            try:
                for action in current.actions:
                    if isinstance(action, Finalize) and desired is not None:
                        # The store records Deleted as it removes the object: what the
                        # teardown did is told first.
                        await self._record(
                            desired, [*events, *events_for(desired, previous, previous, executed, None)]
                        )
                        events, executed = [], []
                    await self._executor.execute(uid, paths, action)
                    executed.append(action)
                    finalized = finalized or isinstance(action, Finalize)
            except TransientError as err:
                error, outcome = str(err), Outcome.TRANSIENT_ERROR
                break
            except TerminalError as err:
                error, outcome = str(err), Outcome.TERMINAL_ERROR
                break
            if not current.again:
                break
        assert current is not None
        assert observed is not None
        if desired is not None and not finalized:
            if current.actions:
                # The world changed since the last look; a plan without actions changed nothing.
                observed = await self._observe(uid, spec, expect_process=previous.pid is not None)
            status = compute_status(
                desired, observed, current, previous, accel=accel, error=error, now=self._clock.now()
            )
            if status != previous:
                await self._write_status(uid, status)
            span.set_attribute("tofu_qemu.phase_after", status.phase.value)
            self._follow_boot(uid, observed, status)
            events += events_for(desired, previous, status, executed, error)
        await self._record(desired, events)
        span.set_attributes({"tofu_qemu.actions": planned, "tofu_qemu.intent": current.intent.value})
        if memory.restarts > restarts_before and memory.last_exit is not None:
            self._restarted(memory.last_exit.reason.value)
        if outcome is Outcome.SUCCESS and current.again:
            # MAX_ROUNDS ran out with steps left: continue soon rather than at the next resync.
            return Result(Outcome.REQUEUE, timedelta(0))
        if outcome is Outcome.SUCCESS and current.requeue_after is not None:
            return Result(Outcome.REQUEUE, current.requeue_after)
        return Result(outcome, error=error)

    def _follow_boot(self, uid: str, observed: Observed, status: QemuVMStatus) -> None:
        """End the boot span once the VM is Ready, or once its process is gone."""
        if status.phase is Phase.RUNNING:
            self._boots.ready(uid)
        elif observed.process is None and not observed.exiting:
            self._boots.abandoned(uid, status.phase.value)

    async def _observe(self, uid: str, spec: QemuVMSpec | None, *, expect_process: bool) -> Observed:
        return await observe(
            uid,
            self._layout.runtime(uid),
            spec=spec,
            runtime=self._runtime,
            allocations=self._allocations,
            images_dir=self._layout.images_dir,
            clock=self._clock,
            images=self._images,
            expect_process=expect_process,
            disks_root=self._layout.disks_root,
        )

    async def _record(self, desired: Desired | None, events: Sequence[VMEvent]) -> None:
        """Record `events` of `desired` (an orphan has no name to file them under). A failed
        write is logged and dropped: the log must never fail what it describes."""
        if desired is None or not events:
            return
        try:
            await self._events.record(
                *(
                    NewEvent(
                        uid=desired.uid,
                        project=desired.project,
                        vm_name=desired.name,
                        reason=event.reason,
                        message=event.message,
                        type=EventType.WARNING if event.warning else EventType.NORMAL,
                    )
                    for event in events
                )
            )
        except Exception as err:
            log.warning("events_dropped", error=f"{type(err).__name__}: {err}", count=len(events))

    async def _write_status(self, uid: str, status: QemuVMStatus) -> None:
        try:
            written = await self._objects.write_status(uid, status.model_dump(mode="json", by_alias=True))
        except StatusConflict:
            return
        if written:
            log.info("status_written", uid=uid, phase=status.phase.value, pid=status.pid)


def _spawns(result: Plan) -> bool:
    return any(isinstance(action, Spawn) for action in result.actions)


def _describe(span: Span, record: VMRecord | None, previous: QemuVMStatus) -> None:
    """What the reconcile starts from, and a link to the write that set the generation it acts
    on (until the controller has acknowledged that generation)."""
    if record is None:
        span.set_attribute("tofu_qemu.found", False)
        return
    span.set_attributes(
        {
            "tofu_qemu.project": record.project,
            "tofu_qemu.vm": record.name,
            "tofu_qemu.generation": record.generation,
            "tofu_qemu.observed_generation": previous.observed_generation,
            "tofu_qemu.phase_before": previous.phase.value,
        }
    )
    cause = span_context_of(record.spec_trace)
    if cause is not None and previous.observed_generation != record.generation:
        span.add_link(cause, {"tofu_qemu.generation": record.generation})
