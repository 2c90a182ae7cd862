"""plan() for base images from the cache or a URL, disk growth and shrinking, retained disks, and
the controller's own shutdown. Table-style, no mocks (tests/unit/test_plan.py has the helpers)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from pathlib import PurePath

import pytest

from api.images import RemoteImage
from api.types import Phase, QemuVMStatus
from controller.actions import (
    CreateDisk,
    DeleteDisk,
    FetchImage,
    GrowDisk,
    RequestPowerdown,
    Spawn,
    WriteSeed,
)
from controller.model import ImageLookup, ImageState, Memory, Observed
from controller.plan import DOWNLOAD_RECHECK, Intent, plan
from controller.status import compute_status
from tests.unit.test_plan import (
    CONTEXT,
    HTTP,
    NOW,
    ROOT_DISK,
    desired,
    digest_for,
    kinds,
    observed,
    process,
    ready,
)

URL = "https://images.example/debian-12.qcow2"
DIGEST = "a" * 64
CACHED = PurePath("/data/images/sha256") / DIGEST


def new_disk(lookup: ImageLookup, **fields: object) -> Observed:
    """A VM whose root disk has no file yet and whose base image stands as `lookup`."""
    return observed(ports={HTTP: 20080}, bases={"root": lookup}, **fields)


def test_url_image_not_cached_is_fetched_and_waited_for() -> None:
    vm = desired(disks=[{"name": "root", "image": URL}])
    result = plan(
        vm, new_disk(ImageLookup(ImageState.MISSING, reason="ImageNotFound")), Memory(), CONTEXT, now=NOW
    )
    assert result.intent is Intent.WAITING_FOR_IMAGES
    assert result.actions == (FetchImage(RemoteImage(URL, None)),)
    assert (result.reason, result.requeue_after) == ("ImageDownloading", DOWNLOAD_RECHECK)


def test_two_disks_on_one_url_fetch_once() -> None:
    vm = desired(disks=[{"name": "root", "image": URL}, {"name": "copy", "image": URL}])
    missing = ImageLookup(ImageState.MISSING)
    seen = observed(ports={HTTP: 20080}, bases={"root": missing, "copy": missing})
    assert kinds(plan(vm, seen, Memory(), CONTEXT, now=NOW)) == [FetchImage]


def test_download_in_progress_waits_without_acting() -> None:
    vm = desired(disks=[{"name": "root", "image": URL}])
    fetching = ImageLookup(ImageState.FETCHING, reason="ImageDownloading", message="41 %")
    result = plan(vm, new_disk(fetching), Memory(), CONTEXT, now=NOW)
    assert (result.intent, result.actions, result.reason) == (
        Intent.WAITING_FOR_IMAGES,
        (),
        "ImageDownloading",
    )
    assert "41 %" in result.detail


def test_checksum_mismatch_waits_until_the_retry_time_and_says_why() -> None:
    vm = desired(disks=[{"name": "root", "image": URL, "sha256": DIGEST}])
    failed = ImageLookup(
        ImageState.FAILED,
        reason="ImageChecksumMismatch",
        message=f"expected {DIGEST}, got {'b' * 64}",
        retry_at=NOW + timedelta(seconds=40),
    )
    result = plan(vm, new_disk(failed), Memory(), CONTEXT, now=NOW)
    assert (result.actions, result.reason) == ((), "ImageChecksumMismatch")
    assert result.requeue_after == timedelta(seconds=40)
    status = compute_status(
        vm,
        new_disk(failed),
        result,
        QemuVMStatus(),
        accel=None,
        error=None,
        now=NOW,
    )
    ready_condition = next(c for c in status.conditions if c.type == "Ready")
    assert (status.phase, ready_condition.reason) == (Phase.PENDING, "ImageChecksumMismatch")
    assert DIGEST in ready_condition.message


def test_the_most_actionable_reason_is_shown_first() -> None:
    vm = desired(disks=[{"name": "root", "image": URL}, {"name": "data", "image": f"sha256:{DIGEST}"}])
    seen = observed(
        ports={HTTP: 20080},
        bases={
            "root": ImageLookup(ImageState.FETCHING, reason="ImageDownloading"),
            "data": ImageLookup(ImageState.MISSING, reason="ImageNotFound", message="not in the cache"),
        },
    )
    assert plan(vm, seen, Memory(), CONTEXT, now=NOW).reason == "ImageNotFound"


def test_cached_base_creates_the_overlay_on_it() -> None:
    vm = desired(disks=[{"name": "root", "image": f"sha256:{DIGEST}", "reclaimPolicy": "Retain"}])
    result = plan(vm, new_disk(ImageLookup(ImageState.READY, path=CACHED)), Memory(), CONTEXT, now=NOW)
    assert vm.spec is not None
    assert result.actions == (CreateDisk(vm.spec.disks[0], CACHED, "lab", "web"),)


def test_a_running_vm_keeps_running_while_a_new_disk_waits_for_its_image() -> None:
    before = desired()
    running = process(digest_for(before))
    vm = desired(disks=[{"name": "root", "image": "base.raw"}, {"name": "data", "image": URL}])
    seen = observed(**ready(process=running, bases={"data": ImageLookup(ImageState.FETCHING)}))
    liveness = replace(CONTEXT, liveness_period=timedelta(seconds=10))
    result = plan(vm, seen, Memory(), liveness, now=NOW)
    assert (result.intent, result.actions) == (Intent.WAITING_FOR_IMAGES, ())
    # Still asked about as often as any running VM, not only when the download ends.
    assert result.requeue_after == timedelta(seconds=10)
    status = compute_status(vm, seen, result, QemuVMStatus(), accel=None, error=None, now=NOW)
    assert status.phase is Phase.RUNNING
    assert {c.type: c.status.value for c in status.conditions}["Synced"] == "False"


@pytest.mark.parametrize(
    ("size_mib", "recorded", "actions"),
    [
        pytest.param(2048, 1024, [GrowDisk, Spawn], id="grows-before-start"),
        pytest.param(1024, 1024, [Spawn], id="same-size"),
        pytest.param(1024, None, [GrowDisk, Spawn], id="unknown-size-is-checked"),
    ],
)
def test_disk_growth_applies_at_start(size_mib: int, recorded: int | None, actions: list[type]) -> None:
    vm = desired(disks=[{"name": "root", "image": "base.raw", "size": size_mib}])
    seen = observed(**ready(disks={"root": replace(ROOT_DISK, size_mib=recorded)}))
    result = plan(vm, seen, Memory(), CONTEXT, now=NOW)
    assert kinds(result) == actions
    if GrowDisk in actions:
        assert result.actions[0] == GrowDisk("root", ROOT_DISK.path, size_mib)


def test_growing_a_running_vms_disk_restarts_it_gracefully() -> None:
    vm = desired(disks=[{"name": "root", "image": "base.raw", "size": 1024}])
    running = process(digest_for(vm))
    grown = desired(disks=[{"name": "root", "image": "base.raw", "size": 4096}])
    result = plan(grown, observed(**ready(process=running)), Memory(), CONTEXT, now=NOW)
    assert (result.intent, kinds(result)) == (Intent.RESTARTING, [RequestPowerdown])
    assert "4096 MiB" in result.detail


@pytest.mark.parametrize("running", [True, False], ids=["running", "stopped"])
def test_shrinking_is_refused_and_changes_nothing(running: bool) -> None:
    vm = desired(disks=[{"name": "root", "image": "base.raw", "size": 512}])
    proc = process(digest_for(desired())) if running else None  # argv does not depend on size
    seen = observed(**ready(process=proc))
    result = plan(vm, seen, Memory(), CONTEXT, now=NOW)
    assert (result.intent, result.actions, result.reason) == (Intent.REFUSED, (), "DiskShrinkRefused")
    assert "1024 MiB" in result.detail
    assert "512 MiB" in result.detail
    status = compute_status(vm, seen, result, QemuVMStatus(), accel=None, error=None, now=NOW)
    by_type = {c.type: (c.status.value, c.reason) for c in status.conditions}
    assert status.phase is (Phase.RUNNING if running else Phase.FAILED)
    assert by_type["Synced"] == ("False", "DiskShrinkRefused")
    assert by_type["Ready"] == (("True", "Running") if running else ("False", "DiskShrinkRefused"))


def test_teardown_deletes_each_disk_at_its_recorded_path() -> None:
    elsewhere = replace(ROOT_DISK, path=PurePath("/data/disks/older-uid/root.qcow2"))
    result = plan(desired(deleting=True), observed(disks={"root": elsewhere}), Memory(), CONTEXT, now=NOW)
    assert DeleteDisk("root", elsewhere.path) in result.actions


def test_an_adopted_disk_is_used_at_its_recorded_path() -> None:
    elsewhere = replace(ROOT_DISK, path=PurePath("/data/disks/older-uid/root.qcow2"))
    result = plan(desired(), observed(**ready(disks={"root": elsewhere})), Memory(), CONTEXT, now=NOW)
    spawn = result.actions[-1]
    assert isinstance(spawn, Spawn)
    assert any(str(elsewhere.path) in argument for argument in spawn.argv)


def test_shutting_down_stops_running_vms_and_starts_none() -> None:
    shutting_down = replace(CONTEXT, shutting_down=True)
    vm = desired()
    running = plan(vm, observed(**ready(process=process(digest_for(vm)))), Memory(), shutting_down, now=NOW)
    assert (running.intent, kinds(running)) == (Intent.SHUTTING_DOWN, [RequestPowerdown])
    assert running.memory.stop_requested_at == NOW
    stopped = plan(vm, observed(**ready()), Memory(), shutting_down, now=NOW)
    assert (stopped.intent, stopped.actions) == (Intent.SHUTTING_DOWN, ())
    status = compute_status(vm, observed(**ready()), stopped, QemuVMStatus(), accel=None, error=None, now=NOW)
    assert status.phase is Phase.STOPPED


def test_cloud_init_seed_is_written_before_spawn_and_named_by_its_content() -> None:
    vm = desired(cloudInit={"userData": "#!/bin/sh\necho hi\n"})
    result = plan(vm, observed(**ready()), Memory(), CONTEXT, now=NOW)
    assert kinds(result) == [WriteSeed, Spawn]
    seed, spawn = result.actions
    assert isinstance(seed, WriteSeed)
    assert isinstance(spawn, Spawn)
    assert dict(seed.files)["user-data"] == b"#!/bin/sh\necho hi\n"
    assert seed.path.parent == CONTEXT.runtime.directory
    assert seed.path.name.startswith("cidata-")
    assert any(str(seed.path) in argument for argument in spawn.argv)


def test_a_cloud_init_change_restarts_and_an_unrelated_change_keeps_the_seed() -> None:
    vm = desired(cloudInit={"userData": "one"})
    running = observed(**ready(process=process(digest_for(vm))))
    changed = plan(desired(cloudInit={"userData": "two"}), running, Memory(), CONTEXT, now=NOW)
    assert (changed.intent, kinds(changed)) == (Intent.RESTARTING, [RequestPowerdown])
    relabelled = plan(replace(vm, generation=7), running, Memory(), CONTEXT, now=NOW)
    assert (relabelled.intent, relabelled.actions) == (Intent.RUNNING, ())
