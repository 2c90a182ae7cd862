"""The event log against a real store: record, list, prune, batching, the store's own events and
the controller's, in-process with the stand-in QEMU that fails at start."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from api.store import Database, StateStore
from api.store.events import MESSAGE_MAX_BYTES, EventLog, EventRecord, EventType, NewEvent
from api.testing.tfstate import vm_state
from api.testing.waiting import wait_until_async
from tests.component.conftest import FakeClock
from tests.component.test_controller_failures import SPEC, Harness, controller_on, fake_qemu
from tests.component.test_store_states import lock_info, write

__all__ = ["fake_qemu"]  # a fixture used by this module's tests

TRACER = TracerProvider().get_tracer("tests")


def event(reason: str, *, name: str = "web", message: str = "m", uid: str = "u-web") -> NewEvent:
    return NewEvent(uid=uid, project="lab", vm_name=name, reason=reason, message=message)


@pytest.fixture
def events(db: Database) -> EventLog:
    return EventLog(db, per_vm_limit=3, max_age=timedelta(hours=1))


def reasons(records: list[EventRecord]) -> list[str]:
    return [record.reason for record in records]


async def test_list_is_oldest_first_filtered_and_pages_by_id(events: EventLog) -> None:
    """list filters by VM, returns the newest `limit` oldest first, and resumes after an id."""
    await events.record(event("Created"), event("Created", name="db", uid="u-db"), event("Started"))
    web = await events.list(project="lab", vm_name="web")
    assert reasons(web) == ["Created", "Started"]
    assert reasons(await events.list(uid="u-db")) == ["Created"]
    assert reasons(await events.list(project="lab", limit=2)) == ["Created", "Started"]
    assert await events.list(project="lab", after_id=web[-1].id) == []
    assert reasons(await events.list(project="lab", after_id=web[0].id)) == ["Created", "Started"]


async def test_an_event_has_its_time_type_and_trace(events: EventLog, clock: FakeClock) -> None:
    """Time comes from the store clock; trace_id from the current span unless given."""
    with TRACER.start_as_current_span("request") as span:
        await events.record(NewEvent("u", "lab", "web", "ExitDetected", "crashed", EventType.WARNING))
    await events.record(NewEvent("u", "lab", "web", "Started", "QEMU started", trace_id="ab" * 16))
    crashed, started = await events.list(uid="u")
    assert (crashed.time, crashed.type, crashed.message) == (clock.now, EventType.WARNING, "crashed")
    assert crashed.trace_id == format(span.get_span_context().trace_id, "032x")
    assert started.trace_id == "ab" * 16


async def test_long_messages_are_cut_and_say_so(events: EventLog) -> None:
    """A message longer than 1 KiB of UTF-8 is cut (never inside a character) and marked."""
    await events.record(event("ExitDetected", message="é" * 5000))
    (stored,) = await events.list(uid="u-web")
    assert len(stored.message.encode()) <= MESSAGE_MAX_BYTES
    assert stored.message.endswith("…(truncated)")


def test_a_reason_must_be_camel_case() -> None:
    """A reason that is not CamelCase is a programming error."""
    with pytest.raises(ValueError, match="CamelCase"):
        event("exit detected")


async def test_prune_keeps_the_newest_per_vm_and_drops_old_ones(events: EventLog, clock: FakeClock) -> None:
    """prune keeps per_vm_limit events per (project, name) and none older than max_age."""
    await events.record(*(event(f"Step{n}") for n in range(5)), event("Created", name="db", uid="u-db"))
    assert await events.prune() == 2
    assert reasons(await events.list(vm_name="web")) == ["Step2", "Step3", "Step4"]
    clock.advance(1800)
    await events.record(event("Late"))
    clock.advance(1801)
    assert await events.prune() == 4
    assert reasons(await events.list(project="lab")) == ["Late"]


async def test_concurrent_records_share_transactions(db: Database, events: EventLog) -> None:
    """Fifty records at once are committed in a few transactions, every event stored."""
    commits: list[None] = []
    db.subscribe(lambda: commits.append(None))
    await asyncio.gather(*(events.record(event(f"Step{n}", name=f"vm{n}")) for n in range(50)))
    assert len(commits) <= 3
    assert len(await events.list(project="lab", limit=100)) == 50


async def test_a_record_in_a_callers_transaction_rolls_back_with_it(db: Database, events: EventLog) -> None:
    """With conn, the events are part of the caller's transaction."""

    async def failing_change() -> None:
        async with db.write() as conn:
            await events.record(event("Created"), conn=conn)
            raise RuntimeError("the change failed")

    with pytest.raises(RuntimeError):
        await failing_change()
    assert await events.list(project="lab") == []


async def test_apply_declared_records_created_changed_and_deleting(states: StateStore, db: Database) -> None:
    """Publishing specs records Created, SpecChanged (with the fields) and Deleting, with the
    write's trace id, in the transaction that made the change."""
    log = EventLog(db)
    with TRACER.start_as_current_span("POST /state/{project}") as span:
        await write(states, vm_state(1, {"web": {"cpus": 1}, "db": {}}))
    trace_id = format(span.get_span_context().trace_id, "032x")
    await write(states, vm_state(2, {"web": {"cpus": 2}}))
    web = await log.list(project="lab", vm_name="web")
    assert [(e.reason, e.message) for e in web] == [
        ("Created", 'generation 1 from terraform_data.vm["web"] (state serial 1)'),
        ("SpecChanged", "generation 2: spec.cpus changed (state serial 2)"),
    ]
    assert web[0].trace_id == trace_id
    (db_event, deleting) = await log.list(project="lab", vm_name="db")
    assert (deleting.reason, deleting.message) == (
        "Deleting",
        "removed from the state (state serial 2); releasing its resources",
    )
    assert deleting.uid == db_event.uid


async def test_specs_published_at_unlock_keep_the_writes_trace(states: StateStore, db: Database) -> None:
    """A write under a lock is published at UNLOCK; its Created event names the write's trace."""
    await states.lock("lab", lock_info("a"))
    with TRACER.start_as_current_span("POST /state/{project}") as span:
        await write(states, vm_state(1, {"web": {}}), lock_id="a")
    assert await EventLog(db).list(project="lab") == []
    await states.unlock("lab", "a")
    (created,) = await EventLog(db).list(project="lab")
    assert created.trace_id == format(span.get_span_context().trace_id, "032x")


async def test_an_invalid_spec_is_a_warning(states: StateStore, db: Database) -> None:
    """A created VM whose spec is invalid gets InvalidSpec beside Created."""
    await write(states, vm_state(1, {"web": {"memory": 1}}))
    created, invalid = await EventLog(db).list(project="lab")
    assert (created.reason, invalid.reason, invalid.type) == ("Created", "InvalidSpec", EventType.WARNING)
    assert "spec.memory" in invalid.message


@pytest.fixture
async def harness(tmp_path: Path, fake_qemu: Path) -> AsyncIterator[Harness]:
    async with controller_on(tmp_path) as running:
        yield running


async def wait_for_reasons(harness: Harness, *wanted: str) -> list[EventRecord]:
    log = EventLog(harness.db)
    return await wait_until_async(
        lambda: log.list(project="lab", vm_name="web", limit=1000),
        lambda found: set(wanted) <= set(reasons(found)),
    )


async def test_the_controller_tells_a_vms_life_in_order(harness: Harness) -> None:
    """Created, Scheduled (placed on its host, then admitted to start), PortsAllocated, Started;
    then the crash, the restart, the backoff; then Deleting and Deleted, all under the VM's uid."""
    await harness.declare({"web": SPEC})
    found = await wait_for_reasons(harness, "ExitDetected", "Restarted", "BackOff")
    told = reasons(found)
    assert told[:5] == ["Created", "Scheduled", "Scheduled", "PortsAllocated", "Started"]
    assert found[1].message.startswith("placed on host ")
    assert found[2].message.startswith("admitted to run")
    assert told.index("Started") < told.index("ExitDetected") < told.index("Restarted")
    crash = found[told.index("ExitDetected")]
    assert crash.type is EventType.WARNING
    assert (
        "crashed (exit code 1): qemu-system-x86_64: -kernel tiny-guest/vmlinuz: could not load"
        in crash.message
    )
    assert found[3].message == "host ports tcp/80 -> 20000"
    uid, _ = await harness.status_of("web")
    await harness.declare({})
    found = await wait_for_reasons(harness, "Deleting", "Deleted")
    assert reasons(found)[-1] == "Deleted"
    assert {e.uid for e in found} == {uid}


async def test_a_failed_event_write_does_not_fail_the_reconcile(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the event log broken, the VM is still reconciled and its status written."""

    async def broken(*events: NewEvent) -> None:
        raise OSError("event log unavailable")

    monkeypatch.setattr(harness.controller.events, "record", broken)
    await harness.declare({"web": SPEC})
    status = await harness.wait_for("web", lambda s: s.restarts >= 1)
    assert status.last_exit is not None
