"""What to do about one QemuVMSnapshot or QemuVMRestore, decided from what is seen. Pure.

Level-triggered like the VM reconcile: the decision reads the declared object, its stored
status, the VM and the snapshot tags found in the VM's disk files, never what happened
before. A crash anywhere leaves one of these pictures, and each has one way on
(docs/snapshots.md#failure-behaviour):

- the tag in no disk: take the snapshot;
- the tag in some disks only (a crash between two disks of a stopped VM): delete those, take again;
- the tag in every disk but no ready status (a crash after taking): the snapshot is there, say so;
- a tag whose snapshot no state declares any more: delete it (`orphan_tags`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from api.snapshots import QemuVMRestoreStatus, QemuVMSnapshotStatus, parse_tag, snapshot_tag
from api.types import RunStrategy
from controller.admission import MIB_PER_GIB, Quotas


@dataclass(frozen=True, slots=True)
class VMView:
    """The VM a snapshot or restore names, as this host sees it."""

    uid: str
    running: bool
    run_strategy: RunStrategy
    # Held stopped by an imperative stop, and by whom ("restore/NAME" for a restore's own).
    stopped_by: str | None
    # Disk name -> the tofu tags found in its file.
    tags: Mapping[str, frozenset[str]]
    spec: dict[str, Any]
    # False: the files were not read this pass (`tags` are all empty): a ready snapshot's are
    # read only now and then, as one qemu-img per disk is not worth a pass per second.
    tags_read: bool = True


@dataclass(frozen=True, slots=True)
class Declared:
    name: str
    revision: str
    spec: dict[str, Any]
    error: str | None
    status: dict[str, Any] | None


class Step(StrEnum):
    NOTHING = "nothing"
    REPORT = "report"  # write the status below, nothing else
    TAKE = "take"  # take the snapshot into every disk, then report it ready
    FOUND = "found"  # every disk holds it already (taken before a crash): report it ready
    DROP_PARTIAL = "drop-partial"  # delete the tag from the disks that have it, then take again
    STOP_VM = "stop-vm"  # write the status below (stoppedVm), then stop the VM
    REVERT = "revert"  # revert every disk to the tag, then write the status below
    START_VM = "start-vm"  # lift the restore's own stop


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    status: dict[str, Any] | None = None
    tag: str = ""
    online: bool = False


def restore_owner(name: str) -> str:
    """Who a restore's stop is recorded as (RunOverride.requested_by)."""
    return f"restore/{name}"


def plan_snapshot(snapshot: Declared, vm: VMView | None) -> Decision:
    status = QemuVMSnapshotStatus.model_validate(snapshot.status or {})
    if snapshot.error is not None:
        return _report_snapshot(status, snapshot, error=f"invalid spec: {snapshot.error}")
    tag = snapshot_tag(snapshot.name, snapshot.revision)
    if status.ready_to_use:
        return _still_there(snapshot, status, vm, tag)
    if status.source_uid and (vm is None or vm.uid != status.source_uid):
        # Taken of a VM that is gone now (or replaced by one of the same name): never of another.
        return _report_snapshot(
            status, snapshot, error="the source VM was deleted before the snapshot was ready"
        )
    if vm is None:
        name = snapshot.spec.get("source", {}).get("name")
        return _report_snapshot(status, snapshot, error=f"source VM {name!r} not found in this project")
    if not vm.tags:
        return _report_snapshot(status, snapshot, error="the source VM has no disk to snapshot")
    holding = [disk for disk, tags in vm.tags.items() if tag in tags]
    if len(holding) == len(vm.tags):
        return Decision(Step.FOUND, tag=tag, online=vm.running)
    if holding:
        return Decision(Step.DROP_PARTIAL, tag=tag, online=vm.running)
    return Decision(Step.TAKE, tag=tag, online=vm.running)


def _still_there(snapshot: Declared, status: QemuVMSnapshotStatus, vm: VMView | None, tag: str) -> Decision:
    """A ready snapshot stays ready while its VM and the tag in each of its disks do."""
    if vm is None or vm.uid != status.source_uid:
        return _report_snapshot(
            status, snapshot, error="the source VM was deleted, and its disks with the snapshot"
        )
    gone = sorted(disk for disk in status.disks if tag not in vm.tags.get(disk, frozenset()))
    if gone and vm.tags_read:
        return _report_snapshot(
            status, snapshot, error=f"the snapshot is gone from disk(s) {', '.join(gone)}"
        )
    return Decision(Step.NOTHING)


def _report_snapshot(status: QemuVMSnapshotStatus, snapshot: Declared, *, error: str) -> Decision:
    wanted = status.model_copy(update={"error": error, "ready_to_use": False, "revision": snapshot.revision})
    if wanted == status:
        return Decision(Step.NOTHING)
    return Decision(Step.REPORT, status=wanted.model_dump(mode="json", by_alias=True))


def plan_restore(restore: Declared, snapshot: Declared | None, vm: VMView | None) -> Decision:
    status = QemuVMRestoreStatus.model_validate(restore.status or {})
    owner = restore_owner(restore.name)
    if status.complete:
        if status.stopped_vm and vm is not None and vm.stopped_by == owner:
            return Decision(Step.START_VM)
        return Decision(Step.NOTHING)
    problem = _restore_problem(restore, snapshot, vm)
    if problem is not None:
        return _report_restore(status, restore, problem)
    assert snapshot is not None
    assert vm is not None
    tag = snapshot_tag(snapshot.name, snapshot.revision)
    if vm.running:
        if vm.stopped_by is not None:
            return Decision(Step.NOTHING)  # stopping: a later pass sees it stopped
        # Not held stopped: never asked, or asked (stoppedVm) by a pass that died before the
        # request was stored, or lifted by a `start` since: asked (again).
        if vm.run_strategy is RunStrategy.ALWAYS and not status.stopped_vm:
            return _report_restore(
                status,
                restore,
                "the VM is running and its runStrategy Always does not allow stopping it: stop it first"
                " (tofu-qemu stop vm NAME) or use runStrategy RerunOnFailure",
            )
        stopping = status.model_copy(update={"stopped_vm": True, "revision": restore.revision, "error": None})
        return Decision(Step.STOP_VM, status=stopping.model_dump(mode="json", by_alias=True))
    done = status.model_copy(update={"complete": True, "error": None, "revision": restore.revision})
    return Decision(Step.REVERT, tag=tag, status=done.model_dump(mode="json", by_alias=True))


def _restore_problem(restore: Declared, snapshot: Declared | None, vm: VMView | None) -> str | None:
    if restore.error is not None:
        return f"invalid spec: {restore.error}"
    target = restore.spec.get("target", {}).get("name")
    if vm is None:
        return f"target VM {target!r} not found in this project"
    if snapshot is None:
        return f"snapshot {restore.spec.get('snapshot')!r} not found in this project"
    snapshot_status = QemuVMSnapshotStatus.model_validate(snapshot.status or {})
    if not snapshot_status.ready_to_use:
        return f"snapshot {snapshot.name!r} is not ready to use"
    if snapshot_status.source_uid != vm.uid:
        # The one guard that keeps a restore off another VM's disks.
        return f"snapshot {snapshot.name!r} is of another VM than {target!r}"
    tag = snapshot_tag(snapshot.name, snapshot.revision)
    missing = sorted(disk for disk, tags in vm.tags.items() if tag not in tags)
    if missing or set(vm.tags) != set(snapshot_status.disks):
        return f"the VM's disks no longer match snapshot {snapshot.name!r} (disks {snapshot_status.disks})"
    return None


def _report_restore(status: QemuVMRestoreStatus, restore: Declared, error: str) -> Decision:
    wanted = status.model_copy(update={"error": error, "revision": restore.revision})
    if wanted == status:
        return Decision(Step.NOTHING)
    return Decision(Step.REPORT, status=wanted.model_dump(mode="json", by_alias=True))


def orphan_tags(tags: Mapping[str, frozenset[str]], declared: Iterable[Declared]) -> set[str]:
    """The tofu tags in a VM's disks that no declared snapshot of its project wants."""
    wanted = {snapshot_tag(snapshot.name, snapshot.revision) for snapshot in declared}
    found = {tag for disk_tags in tags.values() for tag in disk_tags if parse_tag(tag) is not None}
    return found - wanted


@dataclass(frozen=True, slots=True)
class DiskUse:
    """MiB held on disk: the VMs' disks (as created or grown) and the snapshots taken, server-wide
    and in the snapshot's project."""

    server_mib: int
    project_mib: int


def disk_quota_problem(quotas: Quotas, project: str, use: DiskUse, snapshot_mib: int) -> str | None:
    """Why a snapshot of `snapshot_mib` does not fit max_disk_gib (the server's, then the
    project's) on top of `use`; None when it fits. A snapshot may come to pin all of its disks'
    space, so it counts as their size, like a disk."""
    for scope, quota, used in (
        ("server", quotas.server, use.server_mib),
        (f"project {project}", quotas.project(project), use.project_mib),
    ):
        if quota.max_disk_gib is not None and used + snapshot_mib > quota.max_disk_gib * MIB_PER_GIB:
            return (
                f"max_disk_gib of the {scope} exceeded: {used} MiB held by disks and snapshots,"
                f" this snapshot needs {snapshot_mib} MiB of {quota.max_disk_gib * MIB_PER_GIB} MiB"
            )
    return None
