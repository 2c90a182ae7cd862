"""The snapshot controller: takes QemuVMSnapshots, performs QemuVMRestores and deletes the data of
snapshots no state declares any more (docs/snapshots.md). One pass per second while anything is
unsettled, else at commits and for the orphan scan; level-triggered:
each pass reads the declared objects, their statuses, the VMs and the tags in their disk files,
decides with snapshot_plan.py and acts; a crash anywhere is picked up by the next pass.

It acts only on VMs placed on this host, whose disks are here. The VM reconcile keeps running
the VMs: a restore stops and starts its VM through the imperative stop (RunOverride), recorded
as `restore/NAME`, and reverts the disks only once the VM's QEMU is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from api.snapshots import RESTORE_KIND, SNAPSHOT_KIND, Indication, QemuVMSnapshotStatus
from api.store.allocations import Allocations
from api.store.db import Database
from api.store.errors import NotFound
from api.store.records import VMRecord
from api.store.snapshots import SnapshotRecord, SnapshotStore, held_by_snapshots
from api.store.vms import RunAction, VMStore
from api.types import QemuVMSpec, RunStrategy
from controller import snapshot_disks
from controller.admission import Quotas
from controller.faults import CrashPoint, crash_point, kill_at
from controller.hypervisor import CommandRefused, CommandUnanswered
from controller.resources.disks import DiskError
from controller.snapshot_disks import Disk, QmpRunner
from controller.snapshot_plan import (
    Decision,
    Declared,
    DiskUse,
    Step,
    VMView,
    disk_quota_problem,
    orphan_tags,
    plan_restore,
    plan_snapshot,
)

log = structlog.get_logger(__name__)
PASS_SECONDS = 1.0
# Tags of undeclared snapshots are looked for at least this often (and whenever the declared
# snapshots change): listing every disk's snapshots costs one qemu-img per disk.
ORPHAN_SCAN_SECONDS = 60.0
_FAILURES = (DiskError, CommandRefused, CommandUnanswered, OSError)


class GuestFreezer(Protocol):
    """The guest agent's filesystem freeze around a snapshot (guest-fsfreeze-freeze/-thaw)."""

    def connected(self, uid: str) -> bool: ...

    async def freeze(self, uid: str) -> bool:
        """Freeze the guest's filesystems; False when the agent did not (the snapshot is then
        crash-consistent, and says NoGuestAgent)."""

    async def thaw(self, uid: str) -> None:
        """:raise OSError: the guest may still be frozen; the snapshot step fails and is tried
        again, which thaws it."""


class NoGuestAgent:
    """No agent: snapshots are crash-consistent and say NoGuestAgent."""

    def connected(self, uid: str) -> bool:
        return False

    async def freeze(self, uid: str) -> bool:
        return False

    async def thaw(self, uid: str) -> None:
        return None


class _Elsewhere(Exception):
    """The VM is placed on another host: that host's controller acts on it."""


class _Launched(Protocol):
    @property
    def pid(self) -> int: ...


class Running(QmpRunner, Protocol):
    def attached_uids(self) -> list[str]: ...

    def attached_record(self, uid: str) -> _Launched | None: ...


@dataclass(frozen=True, slots=True)
class _Target:
    record: VMRecord
    view: VMView
    disks: tuple[Disk, ...]


class SnapshotController:
    def __init__(
        self,
        db: Database,
        *,
        host: str,
        runtime: Running,
        now: Callable[[], datetime],
        quotas: Quotas | None = None,
        freezer: GuestFreezer | None = None,
    ) -> None:
        self._store = SnapshotStore(db)
        self._vms = VMStore(db)
        self._allocations = Allocations(db, host=host)
        self._every_disk = Allocations(db, every_host=True)
        self._quotas = quotas or Quotas()
        self._host = host
        self._runtime = runtime
        self._now = now
        self._freezer: GuestFreezer = freezer or NoGuestAgent()
        self._declared_before: frozenset[tuple[str, str, str]] | None = None
        self._scanned_at = float("-inf")
        self._db = db
        # Something the last pass left to do or to retry: passes go on every PASS_SECONDS.
        self._unsettled = True

    async def run_forever(self) -> None:
        """A pass every PASS_SECONDS while anything is unsettled (a snapshot not ready, a restore
        not complete, an error to retry); otherwise only after a commit (this process's that
        may change specs, or another process's) and for the orphan scan: an idle host with
        settled snapshots reads nothing each second."""
        changed = asyncio.Event()
        self._db.subscribe(changed.set, volatile=False)
        loop = asyncio.get_running_loop()
        seen: int | None = None
        while True:
            version = await self._db.data_version()
            scan_due = loop.time() - self._scanned_at > ORPHAN_SCAN_SECONDS
            if self._unsettled or changed.is_set() or version != seen or scan_due:
                changed.clear()
                seen = version
                await self.run_once()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PASS_SECONDS):
                    await changed.wait()

    async def run_once(self) -> None:
        snapshots = await self._store.list(SNAPSHOT_KIND)
        declared = frozenset((s.project, s.name, s.revision) for s in snapshots)
        loop = asyncio.get_running_loop()
        scan = declared != self._declared_before or loop.time() - self._scanned_at > ORPHAN_SCAN_SECONDS
        for record in snapshots:
            await self._guarded(
                record, self._snapshot(record, snapshots, read_tags=scan or not _ready(record))
            )
        restores = await self._store.list(RESTORE_KIND)
        for record in restores:
            await self._guarded(record, self._restore(record, snapshots, read_tags=not _complete(record)))
        self._unsettled = not all(map(_ready, snapshots)) or not all(map(_complete, restores))
        if scan:
            await self._delete_orphans(snapshots)
            await self._store.forget_undeclared()
            self._declared_before, self._scanned_at = declared, loop.time()

    async def _guarded(self, record: SnapshotRecord, step: Coroutine[Any, Any, None]) -> None:
        """Run one object's step; a failure is its status (and the next pass tries again)."""
        try:
            await step
        except _Elsewhere:
            return
        except _FAILURES as err:
            error = f"{type(err).__name__}: {err}"
            log.warning(
                "snapshot_step_failed",
                kind=record.kind,
                project=record.project,
                name=record.name,
                error=error,
            )
            if record.status is None or record.status.get("error") != error:
                await self._write(
                    record, dict(record.status or {}) | {"error": error, "revision": record.revision}
                )

    async def _snapshot(
        self, record: SnapshotRecord, snapshots: list[SnapshotRecord], *, read_tags: bool
    ) -> None:
        target = await self._target(record.project, record.spec.get("source", {}).get("name"), read_tags)
        decision = plan_snapshot(_declared(record), target.view if target else None)
        if decision.step is Step.REPORT and decision.status is not None:
            await self._write(record, decision.status)
        elif target and decision.step is Step.DROP_PARTIAL:
            await snapshot_disks.delete(self._qmp(target), target.record.uid, target.disks, decision.tag)
        elif target and decision.step in (Step.TAKE, Step.FOUND):
            problem = (
                await self._over_quota(record, target, snapshots) if decision.step is Step.TAKE else None
            )
            if problem is None:
                await self._take(record, target, decision)
            elif (record.status or {}).get("error") != problem:
                await self._write(
                    record, {"readyToUse": False, "error": problem, "revision": record.revision}
                )

    async def _over_quota(
        self, record: SnapshotRecord, target: _Target, snapshots: list[SnapshotRecord]
    ) -> str | None:
        """Whether the snapshot would take the disk space held past max_disk_gib."""
        held = [
            (row.owner.project if row.owner else None, row.size_mib or 0)
            for row in await self._every_disk.disks()
        ]
        held += held_by_snapshots(snapshots).items()
        use = DiskUse(
            sum(mib for _, mib in held), sum(mib for project, mib in held if project == record.project)
        )
        needed = _mib(await snapshot_disks.virtual_bytes(target.disks))
        return disk_quota_problem(self._quotas, record.project, use, needed)

    async def _take(self, record: SnapshotRecord, target: _Target, decision: Decision) -> None:
        uid = target.record.uid
        pause_ms = None
        agent = False
        if decision.step is Step.TAKE and decision.online:
            agent = self._freezer.connected(uid) and await self._freezer.freeze(uid)
            try:
                pause_ms = await self._take_online(target, decision.tag)
            finally:
                if agent:
                    await self._freezer.thaw(uid)
        elif decision.step is Step.TAKE:
            await snapshot_disks.take_offline(target.disks, decision.tag)
        crash_point(CrashPoint.AFTER_SNAPSHOT)
        status = QemuVMSnapshotStatus(
            ready_to_use=True,
            creation_time=self._now(),
            indications=(
                Indication.ONLINE if decision.online else Indication.OFFLINE,
                Indication.GUEST_AGENT if agent else Indication.NO_GUEST_AGENT,
            ),
            revision=record.revision,
            tag=decision.tag,
            disks=tuple(disk.name for disk in target.disks),
            source_uid=uid,
            source_spec=target.view.spec,
            size_bytes=await snapshot_disks.virtual_bytes(target.disks),
            pause_ms=None if pause_ms is None else round(pause_ms, 1),
        )
        await self._write(record, status.model_dump(mode="json", by_alias=True))
        log.info(
            "snapshot_taken",
            project=record.project,
            name=record.name,
            vm=target.record.name,
            pause_ms=pause_ms,
        )

    async def _take_online(self, target: _Target, tag: str) -> float:
        uid = target.record.uid
        taking = asyncio.ensure_future(snapshot_disks.take_online(self._runtime, uid, target.disks, tag))
        await asyncio.sleep(0.001)  # the transaction is on its way to QEMU
        launched = self._runtime.attached_record(uid)
        if launched is not None:
            kill_at(CrashPoint.QEMU_MID_SNAPSHOT, launched.pid)
        return await taking

    async def _restore(
        self, record: SnapshotRecord, snapshots: list[SnapshotRecord], *, read_tags: bool
    ) -> None:
        target = await self._target(record.project, record.spec.get("target", {}).get("name"), read_tags)
        name = record.spec.get("snapshot")
        snapshot = next((s for s in snapshots if s.project == record.project and s.name == name), None)
        decision = plan_restore(
            _declared(record), _declared(snapshot) if snapshot else None, target.view if target else None
        )
        if decision.step is Step.NOTHING:
            return
        if decision.step is Step.REVERT and target:
            await snapshot_disks.revert(target.disks, decision.tag)
            log.info("snapshot_restored", project=record.project, vm=target.record.name, snapshot=name)
        if decision.status is not None:
            status = decision.status | (
                {"restoreTime": self._now().isoformat()} if decision.step is Step.REVERT else {}
            )
            await self._write(record, status)
        if target and decision.step in (Step.STOP_VM, Step.START_VM):
            action = RunAction.STOP if decision.step is Step.STOP_VM else RunAction.START
            await self._vms.request(
                record.project, target.record.name, action, by=f"restore/{record.name}", now=self._now()
            )

    async def _target(self, project: str, name: object, read_tags: bool) -> _Target | None:
        """The live VM of that name, None when there is none. :raise _Elsewhere: another host's."""
        if not isinstance(name, str):
            return None
        try:
            record = await self._vms.get(project, name)
        except NotFound:
            return None
        if record.deleted_at is not None:
            return None
        if record.host not in (None, self._host):
            raise _Elsewhere(record.host)
        _, rows = await self._allocations.held_by(record.uid)
        disks = tuple(Disk(row.name, Path(row.path)) for row in rows)
        tags = {
            disk.name: await snapshot_disks.tofu_tags(disk) if read_tags else frozenset[str]()
            for disk in disks
        }
        override = record.run_override
        view = VMView(
            uid=record.uid,
            running=record.uid in self._runtime.attached_uids(),
            run_strategy=_run_strategy(record),
            stopped_by=override.requested_by if override is not None and override.stopped else None,
            tags=tags,
            spec=record.spec,
            tags_read=read_tags,
        )
        return _Target(record, view, disks)

    async def _delete_orphans(self, snapshots: list[SnapshotRecord]) -> None:
        by_project: dict[str, list[Declared]] = {}
        for snapshot in snapshots:
            by_project.setdefault(snapshot.project, []).append(_declared(snapshot))
        rows = await self._allocations.disks()
        for uid in sorted({row.uid for row in rows}):
            owner = next((row.owner for row in rows if row.uid == uid and row.owner is not None), None)
            if owner is None:
                continue
            disks = tuple(Disk(row.name, Path(row.path)) for row in rows if row.uid == uid)
            try:
                tags = {disk.name: await snapshot_disks.tofu_tags(disk) for disk in disks}
                for tag in sorted(orphan_tags(tags, by_project.get(owner.project, []))):
                    qmp = self._runtime if uid in self._runtime.attached_uids() else None
                    await snapshot_disks.delete(qmp, uid, disks, tag)
                    log.info("snapshot_data_deleted", project=owner.project, vm=owner.vm_name, tag=tag)
            except _FAILURES as err:
                log.warning("snapshot_gc_failed", uid=uid, error=str(err))

    def _qmp(self, target: _Target) -> QmpRunner | None:
        return self._runtime if target.view.running else None

    async def _write(self, record: SnapshotRecord, status: dict[str, object]) -> None:
        await self._store.write_status(
            record.kind, record.project, record.name, record.revision, dict(status), self._now()
        )


def _ready(record: SnapshotRecord) -> bool:
    return bool(record.status and record.status.get("readyToUse"))


def _complete(record: SnapshotRecord) -> bool:
    return bool(record.status and record.status.get("complete"))


def _mib(size_bytes: int) -> int:
    return -(-size_bytes // (1024 * 1024))


def _declared(record: SnapshotRecord) -> Declared:
    return Declared(record.name, record.revision, record.spec, record.error, record.status)


def _run_strategy(record: VMRecord) -> RunStrategy:
    try:
        return QemuVMSpec.model_validate(record.spec).run_strategy
    except ValidationError:
        return RunStrategy.ALWAYS
