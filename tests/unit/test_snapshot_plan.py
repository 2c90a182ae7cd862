"""Table tests of the snapshot and restore decisions (controller/snapshot_plan.py): every picture a
crash can leave has one way on, and a restore never acts on a VM its snapshot was not taken of."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from api.snapshots import parse_tag, snapshot_tag
from api.types import RunStrategy
from controller.admission import Quota, Quotas
from controller.snapshot_plan import (
    Declared,
    DiskUse,
    Step,
    VMView,
    disk_quota_problem,
    orphan_tags,
    plan_restore,
    plan_snapshot,
    restore_owner,
)

REV = "0123456789abcdef"
TAG = snapshot_tag("snap", REV)
OTHER_TAG = snapshot_tag("old", "fedcba9876543210")


def vm(
    *,
    running: bool = True,
    tags: dict[str, frozenset[str]] | None = None,
    uid: str = "uid-a",
    strategy: RunStrategy = RunStrategy.RERUN_ON_FAILURE,
    stopped_by: str | None = None,
) -> VMView:
    found = tags if tags is not None else {"root": frozenset(), "data": frozenset()}
    return VMView(uid, running, strategy, stopped_by, found, {"memory": 256})


def snapshot(status: dict[str, Any] | None = None, *, error: str | None = None) -> Declared:
    return Declared("snap", REV, {"source": {"name": "web"}}, error, status)


def restore(status: dict[str, Any] | None = None) -> Declared:
    return Declared("undo", "1111222233334444", {"target": {"name": "web"}, "snapshot": "snap"}, None, status)


READY = {"readyToUse": True, "sourceUid": "uid-a", "disks": ["data", "root"], "revision": REV}
BOTH = {"root": frozenset({TAG}), "data": frozenset({TAG})}
HALF = {"root": frozenset({TAG}), "data": frozenset[str]()}


@pytest.mark.parametrize(
    ("declared", "view", "step", "online"),
    [
        (snapshot(), vm(), Step.TAKE, True),
        (snapshot(), vm(running=False), Step.TAKE, False),
        # A crash between two disks of a stopped VM: the half is deleted, then it is taken again.
        (snapshot(), vm(running=False, tags=HALF), Step.DROP_PARTIAL, False),
        # A crash after taking, before the status: it is there, only the status is written.
        (snapshot(), vm(tags=BOTH), Step.FOUND, True),
        (snapshot(READY), vm(tags=BOTH), Step.NOTHING, False),
        # Ready, then its VM or its data went: no longer ready (and no longer counted).
        (snapshot(READY), vm(tags=BOTH, uid="uid-new"), Step.REPORT, False),
        (snapshot(READY), None, Step.REPORT, False),
        (snapshot(READY), vm(tags=HALF), Step.REPORT, False),
        # Its files not read this pass: nothing is concluded from their tags.
        (snapshot(READY), replace(vm(tags={"root": frozenset(), "data": frozenset()}), tags_read=False),
         Step.NOTHING, False),
        (snapshot(), None, Step.REPORT, False),
        (snapshot(), vm(tags={}), Step.REPORT, False),
        (snapshot(error="spec.source: Field required"), vm(), Step.REPORT, False),
        # Taken before a crash of a VM that was then replaced by one of the same name.
        (snapshot({"sourceUid": "uid-gone", "revision": REV}), vm(), Step.REPORT, False),
    ],
)  # fmt: skip
def test_snapshot_decisions(declared: Declared, view: VMView | None, step: Step, online: bool) -> None:
    decision = plan_snapshot(declared, view)
    assert decision.step is step
    if step in (Step.TAKE, Step.DROP_PARTIAL, Step.FOUND):
        assert (decision.tag, decision.online) == (TAG, online)


def test_a_reported_error_is_written_once() -> None:
    first = plan_snapshot(snapshot(), None)
    assert first.status is not None
    assert first.status["error"] == "source VM 'web' not found in this project"
    assert first.status["readyToUse"] is False
    assert plan_snapshot(snapshot(first.status), None).step is Step.NOTHING


@pytest.mark.parametrize(
    ("view", "snap", "step", "message"),
    [
        # A running VM whose runStrategy lets it stop: stopped through the restore's own stop.
        (vm(tags=BOTH), snapshot(READY), Step.STOP_VM, ""),
        (vm(tags=BOTH, strategy=RunStrategy.ALWAYS), snapshot(READY), Step.REPORT, "runStrategy Always"),
        # Stopping already (the restore's stop, or the user's): wait for the exit.
        (vm(tags=BOTH, stopped_by="cli"), snapshot(READY), Step.NOTHING, ""),
        (vm(running=False, tags=BOTH), snapshot(READY), Step.REVERT, ""),
        (vm(running=False, tags=BOTH), snapshot({"revision": REV}), Step.REPORT, "not ready"),
        (vm(running=False, tags=BOTH), None, Step.REPORT, "snapshot 'snap' not found"),
        (None, snapshot(READY), Step.REPORT, "target VM 'web' not found"),
        # Never another VM's disks: a snapshot of uid-a does not restore uid-b, even with the tag.
        (vm(running=False, tags=BOTH, uid="uid-b"), snapshot(READY), Step.REPORT, "of another VM"),
        (vm(running=False, tags=HALF), snapshot(READY), Step.REPORT, "no longer match"),
        (vm(running=False, tags={"root": frozenset({TAG})}), snapshot(READY), Step.REPORT, "no longer match"),
    ],
)  # fmt: skip
def test_restore_decisions(view: VMView | None, snap: Declared | None, step: Step, message: str) -> None:
    decision = plan_restore(restore(), snap, view)
    assert decision.step is step
    if message:
        assert decision.status is not None
        assert message in decision.status["error"]
    if step is Step.REVERT:
        assert decision.tag == TAG
        assert decision.status is not None
        assert decision.status["complete"] is True


def test_a_restore_that_stopped_its_vm_starts_it_again_once_complete() -> None:
    stopped = plan_restore(restore(), snapshot(READY), vm(tags=BOTH))
    assert stopped.status is not None
    assert stopped.status["stoppedVm"] is True
    # The stop asked, the pass killed before the request was stored: asked again.
    assert plan_restore(restore(stopped.status), snapshot(READY), vm(tags=BOTH)).step is Step.STOP_VM
    stopping = vm(tags=BOTH, stopped_by=restore_owner("undo"))
    assert plan_restore(restore(stopped.status), snapshot(READY), stopping).step is Step.NOTHING
    ours = vm(running=False, tags=BOTH, stopped_by=restore_owner("undo"))
    reverted = plan_restore(restore(stopped.status), snapshot(READY), ours)
    assert reverted.step is Step.REVERT
    assert reverted.status is not None
    assert plan_restore(restore(reverted.status), snapshot(READY), ours).step is Step.START_VM
    # Started (the stop lifted): done, for good.
    assert plan_restore(restore(reverted.status), snapshot(READY), vm(tags=BOTH)).step is Step.NOTHING
    # The user's own stop is not the restore's to lift.
    users = vm(running=False, tags=BOTH, stopped_by="cli")
    assert plan_restore(restore(reverted.status), snapshot(READY), users).step is Step.NOTHING


def test_orphan_tags_are_tofu_tags_no_snapshot_declares() -> None:
    found = {"root": frozenset({TAG, OTHER_TAG}), "data": frozenset({OTHER_TAG})}
    assert orphan_tags(found, [snapshot()]) == {OTHER_TAG}
    assert orphan_tags(found, []) == {TAG, OTHER_TAG}
    # A changed spec is a new revision: the old revision's data is an orphan.
    moved = Declared("snap", "aaaaaaaaaaaaaaaa", {"source": {"name": "web"}}, None, None)
    assert orphan_tags({"root": frozenset({TAG})}, [moved]) == {TAG}


def test_only_tags_of_tofu_qemus_shape_are_ever_taken_for_its_own() -> None:
    assert parse_tag(TAG) == ("snap", REV)
    for foreign in ("before-upgrade", "tofu:snap", "tofu:Snap:0123456789abcdef", "tofu:snap:0123"):
        assert parse_tag(foreign) is None


@pytest.mark.parametrize(
    ("quotas", "use", "needed", "problem"),
    [
        (Quotas(), DiskUse(10**9, 10**9), 10**6, None),
        # Exactly full fits; one MiB more does not.
        (Quotas(server=Quota(max_disk_gib=1)), DiskUse(1000, 0), 24, None),
        (Quotas(server=Quota(max_disk_gib=1)), DiskUse(1000, 0), 25, "max_disk_gib of the server exceeded"),
        (Quotas(project_default=Quota(max_disk_gib=2)), DiskUse(10**6, 2000), 49, "project lab exceeded"),
        (Quotas(project_default=Quota(max_disk_gib=2)), DiskUse(10**6, 2000), 48, None),
    ],
)
def test_a_snapshot_counts_against_max_disk_gib(
    quotas: Quotas, use: DiskUse, needed: int, problem: str | None
) -> None:
    found = disk_quota_problem(quotas, "lab", use, needed)
    assert (found is None) == (problem is None), found
    if problem is not None:
        assert found is not None
        assert problem in found
