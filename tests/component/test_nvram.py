"""NvramManager with a real store: the NVRAM copied from OVMF's template, private, recorded like a
disk, kept, adopted when retained, and refused from a template that is not one."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from api.store import Database
from api.store.allocations import Allocations, DiskOwner
from api.types import ReclaimPolicy
from controller.actions import PrepareNvram
from controller.qemu.firmware import NVRAM_NAME, OVMF_DIR, OVMF_VARS
from controller.resources.disks import DiskError
from controller.resources.nvram import TEMPLATE_MAX_BYTES, NvramManager

OWNER = DiskOwner("lab", "efi")


@pytest.fixture
def template(tmp_path: Path) -> Path:
    """A stand-in vars template (its content is copied, never interpreted)."""
    path = tmp_path / "OVMF_VARS_4M.fd"
    path.write_bytes(b"\x00" * 16 + b"_FVH" + b"\xff" * 540_652)
    return path


def prepare(template: Path, target: Path, policy: ReclaimPolicy = ReclaimPolicy.DELETE) -> PrepareNvram:
    return PrepareNvram(NVRAM_NAME, template, target, policy, OWNER.project, OWNER.vm_name)


async def test_the_nvram_is_a_private_copy_recorded_like_a_disk(
    db: Database, template: Path, tmp_path: Path
) -> None:
    target = tmp_path / "disks" / "uid-1" / NVRAM_NAME
    await NvramManager(Allocations(db)).prepare("uid-1", prepare(template, target))
    assert target.read_bytes() == template.read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert not target.with_name(NVRAM_NAME + ".partial").exists()
    [row] = (await Allocations(db).held_by("uid-1"))[1]
    assert (row.name, row.path, row.reclaim_policy, row.size_mib, row.base, row.owner) == (
        NVRAM_NAME,
        str(target),
        ReclaimPolicy.DELETE,
        1,
        str(template),
        OWNER,
    )


async def test_an_existing_nvram_is_never_copied_again(db: Database, template: Path, tmp_path: Path) -> None:
    target = tmp_path / "disks" / "uid-1" / NVRAM_NAME
    manager = NvramManager(Allocations(db))
    await manager.prepare("uid-1", prepare(template, target))
    target.write_bytes(b"variables the guest wrote")
    await manager.prepare("uid-1", prepare(template, target))
    assert target.read_bytes() == b"variables the guest wrote"


async def test_a_retained_nvram_is_adopted_by_a_vm_of_the_same_name(
    db: Database, template: Path, tmp_path: Path
) -> None:
    allocations = Allocations(db)
    manager = NvramManager(allocations)
    old = tmp_path / "disks" / "gone-uid" / NVRAM_NAME
    await manager.prepare("gone-uid", prepare(template, old, ReclaimPolicy.RETAIN))
    old.write_bytes(b"boot entries")
    assert [(row.uid, row.name) for row in await allocations.retained_disks()] == [("gone-uid", NVRAM_NAME)]

    new = tmp_path / "disks" / "new-uid" / NVRAM_NAME
    await manager.prepare("new-uid", prepare(template, new, ReclaimPolicy.RETAIN))
    [row] = (await allocations.held_by("new-uid"))[1]
    assert row.path == str(old)
    assert old.read_bytes() == b"boot entries"
    assert not new.exists(), "no second NVRAM was made"
    # A VM that deletes its NVRAM never takes someone's retained one.
    other = tmp_path / "disks" / "other-uid" / NVRAM_NAME
    await manager.prepare("other-uid", prepare(template, other))
    assert other.read_bytes() == template.read_bytes()


async def test_a_missing_or_oversized_template_is_refused(
    db: Database, template: Path, tmp_path: Path
) -> None:
    manager = NvramManager(Allocations(db))
    target = tmp_path / "disks" / "uid-1" / NVRAM_NAME
    with pytest.raises(DiskError, match=r"OVMF vars template .*: No such file or directory"):
        await manager.prepare("uid-1", prepare(tmp_path / "absent.fd", target))
    huge = tmp_path / "huge.fd"
    with huge.open("wb") as file:
        file.truncate(TEMPLATE_MAX_BYTES + 1)
    with pytest.raises(DiskError, match="is not a vars file"):
        await manager.prepare("uid-1", prepare(huge, target))
    assert not target.exists()
    assert TEMPLATE_MAX_BYTES == 8 * 2**20


def test_debians_template_is_within_the_limit() -> None:
    """hack/install-qemu installs ovmf; its 4 MiB build's vars file is 528 KiB."""
    size = Path(OVMF_DIR / OVMF_VARS).stat().st_size
    assert size == 540_672
    assert size <= TEMPLATE_MAX_BYTES
