"""Reconcile one VM in one pass: read desired, observe, plan, execute, write status once.

Called with a uid only (level-triggered): it reads the world fresh every time and never
branches on what triggered it. A step whose result the next step needs (ports before spawn,
spawn before `cont`) ends the pass with requeue(0), or the event it causes (a QMP event, a
pidfd exit) queues the VM again, as controller-runtime does. Status is written with the
pass's events in one store transaction, even when acting failed, so the failure becomes a
condition the user can see; a pass that only hands over to the next one writes nothing
(`_hands_over`).

It depends on Protocols only (the Hypervisor, the store's contracts, accel and admission
sources): tests/unit/test_reconciler_table.py builds it on the fakes.
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

from api.infra.tracing import span_context_of
from api.instancetypes import Resolution
from api.store.contracts import AllocationLedger, StatusStore
from api.store.records import EventType, NewEvent, StatusConflict, VMRecord
from api.types import Accel, Phase, QemuVMSpec, QemuVMStatus
from controller.actions import (
    Action,
    AllocatePorts,
    AttachPasst,
    AttachTpm,
    CreateDisk,
    DeleteDisk,
    Finalize,
    GrowDisk,
    PrepareNvram,
    ReleasePorts,
    Spawn,
    StartPasst,
    StartTpm,
    StopPasst,
    StopTpm,
)
from controller.admission import Admission
from controller.clock import Clock
from controller.errors import TerminalError, TransientError
from controller.events import VMEvent, events_for, tells_of
from controller.executor import Executor
from controller.firmware import TpmEmulators
from controller.hypervisor import Hypervisor
from controller.instancetypes import (
    InstanceTypeSource,
    NoInstanceTypes,
    references_types,
    resolve_record,
    revision_events,
    stamp,
)
from controller.layout import DataLayout
from controller.model import Desired, Memory, Observed
from controller.network import PasstNetworks
from controller.observe import GuestReports, ImageLookups, observe, with_process
from controller.plan import LaunchContext, Plan, plan
from controller.status import compute_status
from controller.telemetry import BootSpans

log = structlog.get_logger(__name__)
# The actions that change what the resource ledger holds (the rest change only the process).
_LEDGER_ACTIONS = (AllocatePorts, ReleasePorts, CreateDisk, GrowDisk, DeleteDisk)
# The NVRAM is in the ledger; the swtpm is observed with it.
_FIRMWARE_ACTIONS = (PrepareNvram, StartTpm, AttachTpm, StopTpm)
# passt is observed with the ledger too (docs/networking.md).
_NETWORK_ACTIONS = (StartPasst, AttachPasst, StopPasst)


class AccelSource(Protocol):
    """Which accelerator a spec's `accel` means on this host (controller/qemu/accel.py)."""

    async def resolve(self, requested: Accel) -> Accel: ...


class AdmissionSource(Protocol):
    """Whether the quotas let a VM start (controller/quota_gate.py)."""

    async def admission(self, uid: str, generation: int) -> Admission: ...


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


def desired_from(record: VMRecord | None, resolution: Resolution | None = None) -> Desired | None:
    """`resolution`: the spec resolved against the VM's instance type and preference, if any."""
    if record is None:
        return None
    spec: QemuVMSpec | None = None
    spec_error = record.spec_error
    if resolution is not None:
        spec, spec_error = resolution.spec, resolution.error
    elif spec_error is None:
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
        paused_since=status.paused_since,
    )


class Reconciler:
    def __init__(
        self,
        *,
        objects: StatusStore,
        allocations: AllocationLedger,
        hypervisor: Hypervisor,
        executor: Executor,
        accel: AccelSource,
        layout: DataLayout,
        clock: Clock,
        boots: BootSpans,
        quotas: AdmissionSource,
        memory_reserve_mib: int = 0,
        storage_reserve_mib: int = 0,
        liveness_period: timedelta | None = None,
        forward_address: str = "127.0.0.1",
        images: ImageLookups | None = None,
        shutting_down: Callable[[], bool] = lambda: False,
        restarted: Callable[[str], None] = lambda _reason: None,
        instance_types: InstanceTypeSource | None = None,
        tpms: TpmEmulators | None = None,
        guests: GuestReports | None = None,
        passts: PasstNetworks | None = None,
    ) -> None:
        """`restarted(reason)` is told of every restart, with the exit reason that caused it;
        `shutting_down()` says whether the controller is stopping every VM before it exits.
        What each reconcile did goes to `objects` as the VM's events, with its status."""
        self._instance_types: InstanceTypeSource = instance_types or NoInstanceTypes()
        self._tpms = tpms
        self._guests = guests
        self._passts = passts
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
        self._hypervisor = hypervisor
        self._executor = executor
        self._accel = accel
        self._layout = layout
        self._clock = clock

    async def reconcile(self, uid: str) -> Result:
        """Converge `uid` one step; the current span (the reconcile's root) gets what was seen
        and done. Log lines inside name the VM's project and name too (the caller binds its uid).
        """
        record = await self._objects.get(uid)
        names = {"project": record.project, "vm": record.name} if record is not None else {}
        with structlog.contextvars.bound_contextvars(**names):
            return await self._converge(uid, record)

    async def _converge(self, uid: str, record: VMRecord | None) -> Result:
        """One pass: observe, plan, execute, then compute and write status once."""
        span = trace.get_current_span()
        previous = QemuVMStatus.model_validate(record.status) if record and record.status else QemuVMStatus()
        resolution = (
            await resolve_record(record, previous, self._instance_types, self._clock.now())
            if record
            else None
        )
        desired = desired_from(record, resolution)
        if desired is not None and desired.spec is not None and not desired.deleting:
            desired = replace(desired, admission=await self._quotas.admission(uid, desired.generation))
        spec = desired.spec if desired else None
        accel = await self._accel.resolve(spec.accel) if spec else Accel.TCG
        _describe(span, record, previous)
        memory = memory_from(previous)
        expect_process = previous.pid is not None
        observed = await self._observe(uid, spec, expect_process=expect_process)
        decided = plan(desired, observed, memory, self._context(uid, accel), now=self._clock.now())
        decided = spawn_after_stored(decided, memory)
        executed, outcome, error = await self._execute(uid, decided.actions)
        span.set_attributes(
            {
                "tofu_qemu.actions": [type(action).__name__ for action in decided.actions],
                "tofu_qemu.intent": decided.intent.value,
            }
        )
        if desired is not None and not any(isinstance(action, Finalize) for action in executed):
            if decided.actions:
                # The world changed since the look; status tells what is there now.
                observed = await self._look_again(uid, spec, observed, decided.actions, expect_process)
            typed = _Typed(resolution, references_types(record))
            await self._publish(desired, observed, decided, previous, executed, error, accel, typed)
        if decided.memory.restarts > memory.restarts and decided.memory.last_exit is not None:
            self._restarted(decided.memory.last_exit.reason.value)
        return _result(decided, outcome, error)

    def _context(self, uid: str, accel: Accel) -> LaunchContext:
        return LaunchContext(
            accel=accel,
            runtime=self._layout.runtime(uid),
            images_dir=self._layout.images_dir,
            disks_dir=self._layout.disks_dir(uid),
            memory_reserve_mib=self._memory_reserve_mib,
            storage_reserve_mib=self._storage_reserve_mib,
            liveness_period=self._liveness_period,
            forward_address=self._forward_address,
            shutting_down=self._shutting_down(),
        )

    async def _execute(self, uid: str, actions: Sequence[Action]) -> tuple[list[Action], Outcome, str | None]:
        """Perform `actions` in order until one fails; returns those that succeeded."""
        paths = self._layout.runtime(uid)
        executed: list[Action] = []
        try:
            for action in actions:
                await self._executor.execute(uid, paths, action)
                executed.append(action)
        except TransientError as err:
            return executed, Outcome.TRANSIENT_ERROR, str(err)
        except TerminalError as err:
            return executed, Outcome.TERMINAL_ERROR, str(err)
        return executed, Outcome.SUCCESS, None

    async def _publish(
        self,
        desired: Desired,
        observed: Observed,
        decided: Plan,
        previous: QemuVMStatus,
        executed: Sequence[Action],
        error: str | None,
        accel: Accel,
        typed: _Typed,
    ) -> None:
        """Compute status once; write it, if it changed, with the pass's events.

        A pass that only hands over to the next one writes nothing: that pass computes status
        again from what it sees and tells the same events from the same stored status, so this
        write would be outdated before anyone read it."""
        now = self._clock.now()
        status = compute_status(desired, observed, decided, previous, accel=accel, error=error, now=now)
        status = stamp(status, previous, typed.resolution, references=typed.references, now=now)
        trace.get_current_span().set_attribute("tofu_qemu.phase_after", status.phase.value)
        self._follow_boot(desired.uid, observed, status)
        if _hands_over(decided, previous, executed, error):
            return
        told = [*events_for(desired, previous, status, executed, error), *revision_events(previous, status)]
        events = _new_events(desired, told)
        if status != previous or events:
            await self._write_status(desired.uid, status, events)

    def _follow_boot(self, uid: str, observed: Observed, status: QemuVMStatus) -> None:
        """End the boot span once the VM is Ready or Paused, or once its process is gone."""
        if status.phase is Phase.RUNNING:
            self._boots.ready(uid)
        elif status.phase is Phase.PAUSED:
            self._boots.paused(uid)
        elif observed.process is None and not observed.exiting:
            self._boots.abandoned(uid, status.phase.value)

    async def _look_again(
        self,
        uid: str,
        spec: QemuVMSpec | None,
        observed: Observed,
        actions: Sequence[Action],
        expect_process: bool,
    ) -> Observed:
        """Observe after acting: the ledger is read again only when an action changed it."""
        if any(
            isinstance(action, _LEDGER_ACTIONS + _FIRMWARE_ACTIONS + _NETWORK_ACTIONS) for action in actions
        ):
            return await self._observe(uid, spec, expect_process=expect_process)
        paths = self._layout.runtime(uid)
        return with_process(
            observed, await self._hypervisor.inspect(uid, paths, expect_process=expect_process)
        )

    async def _observe(self, uid: str, spec: QemuVMSpec | None, *, expect_process: bool) -> Observed:
        return await observe(
            uid,
            self._layout.runtime(uid),
            spec=spec,
            hypervisor=self._hypervisor,
            allocations=self._allocations,
            images_dir=self._layout.images_dir,
            images=self._images,
            expect_process=expect_process,
            disks_root=self._layout.disks_root,
            tpms=self._tpms,
            guests=self._guests,
            passts=self._passts,
        )

    async def _write_status(self, uid: str, status: QemuVMStatus, events: Sequence[NewEvent]) -> None:
        """Store status and the pass's events in one transaction. A VM gone meanwhile keeps
        neither (its `Deleted` event is its last); any other failure stores neither and fails
        the pass, whose retry computes status again from what it then sees."""
        try:
            written = await self._objects.write_status(
                uid, status.model_dump(mode="json", by_alias=True), events
            )
        except StatusConflict:
            return
        if written:
            log.info("status_written", uid=uid, phase=status.phase.value, pid=status.pid)


@dataclass(frozen=True, slots=True)
class _Typed:
    """The pass's instance-type resolution, for the status (controller/instancetypes.py)."""

    resolution: Resolution | None
    references: bool


def spawn_after_stored(decided: Plan, stored: Memory) -> Plan:
    """A Spawn clears the exit record its plan's memory was folded from, so it runs only in a
    pass whose memory is stored already: a controller killed right after it loses no exit.
    Otherwise this pass stores the memory and the next one (at once) spawns. When the next
    retry is due is not worth a pass: a lost one is harmless."""
    if not any(isinstance(action, Spawn) for action in decided.actions):
        return decided
    if replace(decided.memory, next_retry_at=stored.next_retry_at) == stored:
        return decided
    return replace(decided, actions=(), again=True)


def _hands_over(decided: Plan, previous: QemuVMStatus, executed: Sequence[Action], error: str | None) -> bool:
    """Whether the pass asks for requeue(0) with nothing of its own to store: no error, its
    memory (an exit, a count) already stored, and no action whose event is told from the
    action itself (`tells_of`); what else it changed, the next pass sees and tells."""
    return (
        decided.again and error is None and decided.memory == memory_from(previous) and not tells_of(executed)
    )


def _new_events(desired: Desired, events: Sequence[VMEvent]) -> list[NewEvent]:
    return [
        NewEvent(
            uid=desired.uid,
            project=desired.project,
            vm_name=desired.name,
            reason=event.reason,
            message=event.message,
            type=EventType.WARNING if event.warning else EventType.NORMAL,
        )
        for event in events
    ]


def _result(decided: Plan, outcome: Outcome, error: str | None) -> Result:
    if outcome is not Outcome.SUCCESS:
        return Result(outcome, error=error)
    if decided.again:
        return Result(Outcome.REQUEUE, timedelta(0))
    if decided.requeue_after is not None:
        return Result(Outcome.REQUEUE, decided.requeue_after)
    return Result(Outcome.SUCCESS)


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
