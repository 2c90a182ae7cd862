"""DiskManager with real qemu-img and a real store: overlays on safe bases only, growth and
shrinking, and a retained disk adopted by a VM re-created under the same name."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from api.store import Database, StateStore, VMStore
from api.store.allocations import Allocations, DiskOwner
from api.testing.tfstate import manifest, vm_state
from api.types import DiskSpec
from controller.resources.disks import DiskBusy, DiskError, DiskManager
from tests.component.test_store_states import write

OWNER = DiskOwner("lab", "web")
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"


def qemu_img(*args: str) -> str:
    return subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, text=True).stdout


def info(path: Path) -> dict[str, object]:
    result = json.loads(qemu_img("info", "-U", "--output=json", str(path)))
    assert isinstance(result, dict)
    return result


def disk(**fields: object) -> DiskSpec:
    return DiskSpec.model_validate({"name": "root", **fields})


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "images" / "base.qcow2"
    path.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(path), "64M")
    return path


@pytest.fixture
def manager(db: Database, tmp_path: Path) -> DiskManager:
    return DiskManager(Allocations(db), disks_dir=tmp_path / "disks")


async def test_overlay_on_a_base_is_resized_and_recorded(
    manager: DiskManager, base: Path, db: Database
) -> None:
    await manager.create("uid-1", OWNER, disk(image="base.qcow2", size="128Mi"), base)
    target = manager.path("uid-1", "root")
    details = info(target)
    assert (details["format"], details["virtual-size"]) == ("qcow2", 128 * 2**20)
    assert details["backing-filename"] == str(base)
    assert details["backing-filename-format"] == "qcow2"
    [row] = (await Allocations(db).held_by("uid-1"))[1]
    assert (row.size_mib, row.base, row.owner) == (128, str(base), OWNER)


async def test_an_image_without_size_takes_the_base_size(
    manager: DiskManager, base: Path, db: Database
) -> None:
    await manager.create("uid-1", OWNER, disk(image="base.qcow2"), base)
    [row] = (await Allocations(db).held_by("uid-1"))[1]
    assert row.size_mib == 64


async def test_a_disk_smaller_than_its_image_is_refused(manager: DiskManager, base: Path) -> None:
    with pytest.raises(DiskError, match="shrinking is refused"):
        await manager.create("uid-1", OWNER, disk(image="base.qcow2", size="32Mi"), base)
    assert not manager.path("uid-1", "root").exists()


HostileImage = Callable[[str, str], list[str]]


@pytest.mark.parametrize(
    ("make_hostile", "refusal"),
    [
        pytest.param(
            lambda p, host: ["create", "-q", "-f", "qcow2", "-b", host, "-F", "raw", p],
            "has a backing file",
            id="backing-file",
        ),
        pytest.param(
            lambda p, host: ["create", "-q", "-f", "vmdk", p, "1M"], "'vmdk' is not supported", id="vmdk"
        ),
        pytest.param(
            lambda p, host: ["create", "-q", "-f", "qcow2", "-o", f"data_file={host}.data", p, "1M"],
            "has an external data file",
            id="external-data-file",
        ),
    ],
)
async def test_a_base_that_could_reach_host_files_is_refused(
    manager: DiskManager, tmp_path: Path, make_hostile: HostileImage, refusal: str
) -> None:
    """A downloaded qcow2 naming /etc/passwd as its backing file would hand that file to the guest."""
    host_file = tmp_path / "host-secret"
    host_file.write_bytes(b"secret" * 1000)
    hostile = tmp_path / "hostile.img"
    qemu_img(*make_hostile(str(hostile), str(host_file)))
    with pytest.raises(DiskError) as caught:
        await manager.create("uid-1", OWNER, disk(image="hostile.img"), hostile)
    assert refusal in str(caught.value)
    assert not manager.path("uid-1", "root").exists()


async def test_grow_resizes_and_records_shrink_is_refused(manager: DiskManager, db: Database) -> None:
    await manager.create("uid-1", OWNER, disk(size="64Mi"), None)
    path = manager.path("uid-1", "root")
    await manager.grow("uid-1", "root", path, 256)
    assert info(path)["virtual-size"] == 256 * 2**20
    [row] = (await Allocations(db).held_by("uid-1"))[1]
    assert row.size_mib == 256
    with pytest.raises(DiskError, match="shrinking to 128 MiB is refused"):
        await manager.grow("uid-1", "root", path, 128)
    assert info(path)["virtual-size"] == 256 * 2**20


async def test_a_retained_disk_is_adopted_by_a_vm_of_the_same_name(
    manager: DiskManager, db: Database, states: StateStore, vms: VMStore
) -> None:
    allocations = Allocations(db)
    await manager.create("gone-uid", OWNER, disk(size="64Mi", reclaimPolicy="Retain"), None)
    old_path = manager.path("gone-uid", "root")
    old_path_inode = old_path.stat().st_ino
    assert [row.uid for row in await allocations.retained_disks()] == ["gone-uid"]

    await manager.create("new-uid", OWNER, disk(size="64Mi", reclaimPolicy="Retain"), None)

    [row] = (await allocations.held_by("new-uid"))[1]
    assert (row.path, Path(row.path).stat().st_ino) == (str(old_path), old_path_inode)
    assert (await allocations.held_by("gone-uid"))[1] == []
    assert not manager.path("new-uid", "root").exists(), "no second disk was made"
    # Nothing is retained any more: the disk belongs to a VM again (once that VM exists).
    await write(states, vm_state(1, {"web": manifest("web")}))
    assert all(r.uid != "gone-uid" for r in await allocations.retained_disks())


async def test_a_deleting_disk_is_not_adopted_and_a_delete_policy_never_is(
    manager: DiskManager, db: Database, states: StateStore, vms: VMStore
) -> None:
    await write(states, vm_state(1, {"web": manifest("web")}))
    [record] = await vms.list_records(project="lab")
    await manager.create(record.uid, OWNER, disk(size="64Mi", reclaimPolicy="Retain"), None)
    # The old VM object still exists (being deleted): its disk is not free yet.
    with pytest.raises(DiskBusy, match="still being torn down"):
        await manager.create("new-uid", OWNER, disk(size="64Mi", reclaimPolicy="Retain"), None)
    # A VM that does not retain its disk gets a fresh one, never someone's retained data.
    await manager.create("other-uid", OWNER, disk(size="64Mi"), None)
    assert manager.path("other-uid", "root").exists()


async def test_delete_removes_the_file_at_its_recorded_path(manager: DiskManager, db: Database) -> None:
    await manager.create("uid-1", OWNER, disk(size="64Mi"), None)
    path = manager.path("uid-1", "root")
    await manager.delete("uid-1", "root", path)
    await manager.delete("uid-1", "root", path)  # idempotent
    assert not path.exists()
    assert not path.parent.exists()
    assert (await Allocations(db).held_by("uid-1"))[1] == []
