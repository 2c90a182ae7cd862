"""The state store: locks, versions, retention, lineage rules and when specs are published."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from api.store import (
    LineageConflict,
    LockConflict,
    LockInfo,
    LockMismatch,
    NotFound,
    StateLocked,
    StateStore,
    VMStore,
)
from api.store.body_files import BODY_DIR_NAME
from api.testing.tfstate import encode, vm_state
from api.tfstate import extract_vms, parse_state
from tests.component.conftest import FakeClock


def lock_info(lock_id: str, who: str = "root@vm") -> LockInfo:
    return LockInfo.parse(json.dumps({"ID": lock_id, "Operation": "OperationTypeApply", "Who": who}).encode())


async def write(
    states: StateStore, document: dict[str, Any], *, lock_id: str | None = None, project: str = "lab"
) -> None:
    body = encode(document)
    summary = parse_state(body)
    await states.write(project, body, summary, extract_vms(summary.document), lock_id=lock_id)


async def live_names(vms: VMStore, project: str = "lab") -> dict[str, int]:
    return {r.name: r.generation for r in await vms.list_records(project=project) if r.deleted_at is None}


async def test_lock_is_exclusive_and_idempotent_for_the_holder(states: StateStore) -> None:
    """The holder may LOCK again (client retries); anyone else gets the holder's info."""
    await states.lock("lab", lock_info("a"))
    await states.lock("lab", lock_info("a"))
    with pytest.raises(LockConflict) as caught:
        await states.lock("lab", lock_info("b"))
    assert json.loads(caught.value.holder_info)["ID"] == "a"


async def test_write_rules_under_a_lock(states: StateStore) -> None:
    """Under a lock: the holder's ID writes, another ID is a mismatch, no ID is refused."""
    await states.lock("lab", lock_info("a"))
    await write(states, vm_state(1, {}), lock_id="a")
    with pytest.raises(LockMismatch):
        await write(states, vm_state(2, {}), lock_id="b")
    with pytest.raises(StateLocked):
        await write(states, vm_state(2, {}))
    stored = await states.read("lab")
    assert stored is not None
    assert stored.serial == 1


async def test_write_with_id_and_no_lock_is_accepted(states: StateStore) -> None:
    """A write naming a lock nobody holds (after a force-unlock) is accepted."""
    await write(states, vm_state(1, {}), lock_id="gone")
    assert (await states.read("lab")) is not None


async def test_unlock_rules(states: StateStore) -> None:
    """UNLOCK: mismatch refused, holder or force releases, unlocking a free state succeeds."""
    assert await states.unlock("lab", None) is None
    await states.lock("lab", lock_info("a"))
    with pytest.raises(LockMismatch):
        await states.unlock("lab", "b")
    released = await states.unlock("lab", None)
    assert released is not None
    assert json.loads(released)["ID"] == "a"
    await states.lock("lab", lock_info("b"))
    assert await states.unlock("lab", "b") is not None


async def test_specs_written_under_a_lock_publish_at_unlock(states: StateStore, vms: VMStore) -> None:
    """An intermediate snapshot is not published; the state current at UNLOCK is."""
    await states.lock("lab", lock_info("a"))
    await write(states, vm_state(1, {"web": {}}), lock_id="a")
    assert await live_names(vms) == {}
    info = await states.project("lab")
    assert (info.published_serial, info.pending_serial) == (None, 1)
    await write(states, vm_state(2, {"web": {}, "db": {}}), lock_id="a")
    await states.unlock("lab", "a")
    assert await live_names(vms) == {"web": 1, "db": 1}
    info = await states.project("lab")
    assert (info.published_serial, info.pending_serial) == (2, None)


async def test_unlocked_write_publishes_at_once(states: StateStore, vms: VMStore) -> None:
    """A write made with no lock held (-lock=false) is published immediately."""
    await write(states, vm_state(1, {"web": {}}))
    assert await live_names(vms) == {"web": 1}


async def test_generation_bumps_only_on_change(states: StateStore, vms: VMStore) -> None:
    """Same spec: same generation; new memory or labels: generation + 1."""
    await write(states, vm_state(1, {"web": {"memory": 512}}))
    await write(states, vm_state(2, {"web": {"memory": "512Mi"}}))
    assert await live_names(vms) == {"web": 1}
    await write(states, vm_state(3, {"web": {"memory": 1024}}))
    await write(states, vm_state(4, {"web": {"memory": 1024, "labels": {"tier": "web"}}}))
    assert await live_names(vms) == {"web": 3}
    record = await vms.get("lab", "web")
    assert (record.state_serial, record.labels) == (4, {"tier": "web"})


async def test_removed_vm_gets_deletion_timestamp(states: StateStore, vms: VMStore, clock: FakeClock) -> None:
    """A VM gone from the state is kept, marked for deletion, until the controller removes it."""
    await write(states, vm_state(1, {"web": {}, "db": {}}))
    clock.advance(5)
    await write(states, vm_state(2, {"web": {}}))
    record = await vms.get("lab", "db")
    assert record.deleted_at == clock.now
    assert await live_names(vms) == {"web": 1}


async def test_recreated_name_gets_a_new_uid_beside_the_deleting_one(
    states: StateStore, vms: VMStore
) -> None:
    """Re-declaring a name while its old object is still finalising creates a new object."""
    await write(states, vm_state(1, {"web": {}}))
    old_uid = (await vms.get("lab", "web")).uid
    await write(states, vm_state(2, {}))
    await write(states, vm_state(3, {"web": {}}))
    current = await vms.get("lab", "web")
    assert current.uid != old_uid
    assert current.deleted_at is None
    assert len(await vms.list_records(project="lab")) == 2


async def test_invalid_spec_is_stored_with_its_error(states: StateStore, vms: VMStore) -> None:
    """The state is stored and the VM shows Valid=False naming the field."""
    await write(states, vm_state(1, {"web": {"memory": 8}}))
    vm = (await vms.get("lab", "web")).to_object()
    (valid,) = vm.status.conditions
    assert (vm.status.phase, valid.type, valid.status, valid.message) == (
        "Invalid",
        "Valid",
        "False",
        "spec.memory: must be ≥ 16 MiB",
    )


async def test_encrypted_state_keeps_vms_and_reports_unreadable(states: StateStore, vms: VMStore) -> None:
    """An OpenTofu-encrypted write is stored verbatim; existing VMs stay; the project says why."""
    await write(states, vm_state(1, {"web": {}}))
    envelope = json.dumps(
        {"serial": 2, "lineage": "l", "meta": {}, "encrypted_data": "AAAA", "encryption_version": "v0"}
    )
    summary = parse_state(envelope.encode())
    await states.write("lab", envelope.encode(), summary, None, lock_id=None)
    stored = await states.read("lab")
    assert stored is not None
    assert stored.body == envelope.encode()
    assert await live_names(vms) == {"web": 1}
    info = await states.project("lab")
    assert info.specs_note is not None
    assert "encrypted client-side" in info.specs_note
    await write(states, vm_state(3, {"web": {}}))
    assert (await states.project("lab")).specs_note is None


async def test_versions_are_kept_with_lock_holder_and_pruned(states: StateStore) -> None:
    """Every write is a version with who/operation; only the newest history_limit are kept."""
    await states.lock("lab", lock_info("a", who="alice@laptop"))
    for serial in range(1, 6):
        await write(states, vm_state(serial, {}), lock_id="a")
    versions = await states.list_versions("lab")
    # history_limit is 3, plus the published version (none yet is published: all under lock).
    assert [v.serial for v in versions] == [5, 4, 3]
    assert {v.lock_who for v in versions} == {"alice@laptop"}
    old = await states.read_version("lab", 4)
    assert json.loads(old.body)["serial"] == 4
    with pytest.raises(NotFound):
        await states.read_version("lab", 1)


async def test_retention_never_drops_the_published_version(states: StateStore) -> None:
    """The version the controller acts on survives pruning during a long locked apply."""
    await write(states, vm_state(1, {}))
    await states.lock("lab", lock_info("a"))
    for serial in range(2, 7):
        await write(states, vm_state(serial, {}), lock_id="a")
    serials = [v.serial for v in await states.list_versions("lab")]
    assert serials == [6, 5, 4, 1]


async def test_lineage_change_is_accepted_by_default(states: StateStore) -> None:
    """`state push -force` with a new lineage and lower serial is kept (default policy)."""
    await write(states, vm_state(5, {}))
    await write(states, vm_state(3, {}, lineage="other"))
    stored = await states.read("lab")
    assert stored is not None
    assert (stored.serial, stored.lineage) == (3, "other")


async def test_strict_lineage_refuses_and_names_both(db: Any) -> None:
    """With strict_lineage the message names both serials and lineages."""
    strict = StateStore(db, strict_lineage=True)
    await write(strict, vm_state(5, {}))
    with pytest.raises(LineageConflict, match=r"lineage 293de8df.*serial 5.*lineage other \(serial 6\)"):
        await write(strict, vm_state(6, {}, lineage="other"))
    with pytest.raises(LineageConflict, match="lower serial 4"):
        await write(strict, vm_state(4, {}))


async def test_stale_lock_publishes(states: StateStore, vms: VMStore, clock: FakeClock) -> None:
    """A lock held past the limit no longer hides its writes from the controller."""
    await states.lock("lab", lock_info("a"))
    await write(states, vm_state(1, {"web": {}}), lock_id="a")
    clock.advance(60)
    assert await states.publish_stale_locks(timedelta(minutes=15)) == []
    clock.advance(15 * 60)
    assert await states.publish_stale_locks(timedelta(minutes=15)) == ["lab"]
    assert await live_names(vms) == {"web": 1}
    assert await states.publish_stale_locks(timedelta(minutes=15)) == []


async def test_delete_state_marks_vms_and_removes_every_version(states: StateStore, vms: VMStore) -> None:
    """DELETE forgets the state, marks its VMs for deletion, and keeps no version (they hold the
    state's secrets) and no lock: the project is gone."""
    await write(states, vm_state(1, {"web": {}}))
    await write(states, vm_state(2, {"web": {}}))
    await states.lock("lab", lock_info("a"))
    changes = await states.delete("lab", lock_id="a")
    assert [vm.name for vm in changes.deleted] == ["web"]
    assert await states.read("lab") is None
    with pytest.raises(NotFound):
        await states.list_versions("lab")
    with pytest.raises(NotFound):
        await states.read_version("lab", 1)
    assert [p.name for p in await states.list_projects()] == []
    with pytest.raises(NotFound):
        await states.delete("lab", lock_id=None)
    # The project starts afresh: LOCK and writes work, and the first write is version 1 of 1.
    await states.lock("lab", lock_info("b"))
    await write(states, vm_state(3, {"web": {}}), lock_id="b")
    assert [v.serial for v in await states.list_versions("lab")] == [3]


async def test_purge_keeps_the_current_and_the_published_version(states: StateStore) -> None:
    """Under a lock the current version waits to be published: both survive a purge."""
    for serial in (1, 2):
        await write(states, vm_state(serial, {}))
    await states.lock("lab", lock_info("a"))
    await write(states, vm_state(3, {}), lock_id="a")
    outcome = await states.purge("lab")
    assert (outcome.removed, outcome.kept) == (1, 2)
    assert [v.serial for v in await states.list_versions("lab")] == [3, 2]
    stored = await states.read("lab")
    assert stored is not None
    assert stored.serial == 3
    assert (await states.project("lab")).published_serial == 2
    assert (await states.purge("lab")).removed == 0


async def test_purge_keeps_the_newest_when_asked(states: StateStore) -> None:
    for serial in (1, 2, 3):
        await write(states, vm_state(serial, {}))
    outcome = await states.purge("lab", keep=1)
    assert (outcome.removed, outcome.kept) == (1, 2)
    assert [v.serial for v in await states.list_versions("lab")] == [3, 2]


async def test_purge_of_an_unknown_project_is_not_found(states: StateStore) -> None:
    with pytest.raises(NotFound, match="'nope' does not exist"):
        await states.purge("nope")


def store_bytes(data_dir: Path) -> bytes:
    """Every byte of the store: its SQLite files and the body files beside them."""
    files = [*data_dir.glob("tofu-qemu.sqlite3*"), *data_dir.glob(f"{BODY_DIR_NAME}/*")]
    return b"".join(path.read_bytes() for path in sorted(files))


# SQLite only: it reads the store's files. PostgreSQL keeps dead rows until VACUUM (docs/postgres.md).
@pytest.mark.parametrize("database_url", [None])
@pytest.mark.parametrize("how", ["delete", "purge"])
async def test_removed_versions_leave_no_secret_in_the_store_files(
    states: StateStore, tmp_path: Path, how: str
) -> None:
    """The bytes of a removed version are gone from the file and from its WAL, not only from
    the tables: another reader of the files (a copied disk, a backup of the dir) finds nothing."""
    secret = "hunter2-9f1c3e7a-do-not-keep"
    leaky = vm_state(1, {"web": {}})
    leaky["outputs"] = {"password": {"value": secret, "type": "string", "sensitive": True}}
    await write(states, leaky)
    await write(states, vm_state(2, {"web": {}}))
    assert secret.encode() in store_bytes(tmp_path / "data")
    if how == "delete":
        await states.delete("lab", lock_id=None)
    else:
        assert (await states.purge("lab")).removed == 1
    assert secret.encode() not in store_bytes(tmp_path / "data")


async def test_delete_respects_the_lock(states: StateStore) -> None:
    """A locked state cannot be deleted without the holder's ID."""
    await write(states, vm_state(1, {}))
    await states.lock("lab", lock_info("a"))
    with pytest.raises(StateLocked):
        await states.delete("lab", lock_id=None)
    with pytest.raises(LockMismatch):
        await states.delete("lab", lock_id="b")
    await states.delete("lab", lock_id="a")


async def test_store_survives_reopen(tmp_path: Any, clock: FakeClock, database_url: str | None) -> None:
    """Migrations are idempotent and data persists across reopen."""
    from api.store import open_store

    first = await open_store(tmp_path / "d", database_url=database_url, clock=clock)
    await write(StateStore(first), vm_state(7, {}))
    await first.close()
    second = await open_store(tmp_path / "d", database_url=database_url, clock=clock)
    stored = await StateStore(second).read("lab")
    await second.close()
    assert stored is not None
    assert stored.serial == 7
