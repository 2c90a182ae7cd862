"""Which cached images garbage collection must keep: those a live spec names (by digest, or by a
URL whose digest is known) and those an existing disk overlays, retained disks included."""

from __future__ import annotations

from datetime import timedelta

from api.images import CachedImage, RemoteImage
from api.store import Database, StateStore
from api.store.allocations import Allocations, DiskOwner, DiskRow
from api.testing.tfstate import vm_state
from api.types import ReclaimPolicy
from controller.image_gc import referenced_digests
from tests.component.test_store_states import write

DIGESTS = {name: name[0] * 64 for name in ("alpha", "bravo", "charlie", "delta", "echo")}
URL = "https://images.example/debian.qcow2"


class KnownDigests:
    """The image cache as GC sees it: a sidecar told it which digest URL has."""

    def digest_of(self, source: CachedImage | RemoteImage) -> str | None:
        if isinstance(source, CachedImage):
            return source.digest
        return source.digest or (DIGESTS["bravo"] if source.url == URL else None)

    async def collect_garbage(self, referenced: set[str], *, grace: timedelta) -> list[str]:
        raise AssertionError("not called here")


def disk_vm(*disks: dict[str, object]) -> dict[str, object]:
    return {"disks": list(disks)}


async def test_specs_and_disk_bases_are_referenced(db: Database, states: StateStore) -> None:
    await write(
        states,
        vm_state(
            1,
            {
                "by-digest": disk_vm({"name": "root", "image": f"sha256:{DIGESTS['alpha']}"}),
                "by-sidecar": disk_vm({"name": "root", "image": URL}),
                "pinned-url": disk_vm({"name": "root", "image": URL + "?v=2", "sha256": DIGESTS["charlie"]}),
                "unknown-url": disk_vm({"name": "root", "image": "https://elsewhere.example/x.img"}),
                "local-file": disk_vm({"name": "root", "image": "tiny-guest/rootfs.raw"}),
                "invalid": {"memory": 1},
            },
        ),
    )
    allocations = Allocations(db)
    owner = DiskOwner("lab", "gone")
    # A retained disk of a deleted VM still reads its base: that image must stay.
    retained = DiskRow(
        "gone-uid",
        "data",
        "/d/gone/data.qcow2",
        ReclaimPolicy.RETAIN,
        64,
        f"/i/sha256/{DIGESTS['delta']}",
        owner,
    )
    await allocations.record_disk("gone-uid", retained)
    local_base = DiskRow("x", "root", "/d/x/root.qcow2", ReclaimPolicy.DELETE, 64, "/i/tiny-guest/rootfs.raw")
    await allocations.record_disk("x", local_base)

    referenced = await referenced_digests(db, allocations, KnownDigests())

    assert referenced == {DIGESTS["alpha"], DIGESTS["bravo"], DIGESTS["charlie"], DIGESTS["delta"]}
    assert DIGESTS["echo"] not in referenced
