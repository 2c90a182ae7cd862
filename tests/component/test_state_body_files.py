"""State version bodies as files beside the SQLite store (api/store/body_files.py): private,
whole before a row names them, never lost to a crash, a refused write or a sweep, and gone
with their versions."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.store import Database, StateLocked, StateStore, body_files, open_store, state_bodies
from api.store.backup import back_up, restore
from api.store.body_files import BODY_DIR_NAME, BodyDamaged, BodyMissing
from api.store.db import DB_FILE_NAME
from api.store.lock_info import LockInfo
from api.testing.tfstate import encode, vm_state
from api.tfstate import extract_vms, parse_state
from tests.component.conftest import AUTH, FakeClock

REPO = Path(__file__).resolve().parents[2]
# SQLite only: PostgreSQL keeps bodies in their rows (test_store_states.py runs on both).
sqlite_only = pytest.mark.parametrize("database_url", [None])


def body(serial: int, marker: str = "") -> bytes:
    document = vm_state(serial, {"web": {}})
    document["outputs"] = {"password": {"value": f"{marker}-{serial}", "type": "string", "sensitive": True}}
    return encode(document)


async def write(states: StateStore, serial: int, *, lock_id: str | None = None) -> bytes:
    data = body(serial, "kept")
    summary = parse_state(data)
    await states.write("lab", data, summary, extract_vms(summary.document), lock_id=lock_id)
    return data


def rows(data_dir: Path) -> list[tuple[int, int, str | None]]:
    """(serial, length of the row's body, body file) of every version, oldest first."""
    with sqlite3.connect(data_dir / DB_FILE_NAME) as connection:
        found = connection.execute("SELECT serial, length(body), body_file FROM state_versions ORDER BY id")
        return [(int(serial), int(size), name) for serial, size, name in found]


def files(data_dir: Path) -> set[str]:
    directory = data_dir / BODY_DIR_NAME
    return {path.name for path in directory.iterdir()} if directory.exists() else set()


@sqlite_only
async def test_a_body_is_a_private_file_its_row_names(states: StateStore, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    written = await write(states, 1)
    [(serial, in_row, name)] = rows(data_dir)
    assert (serial, in_row) == (1, 0)
    assert name is not None
    assert files(data_dir) == {name}
    path = data_dir / BODY_DIR_NAME / name
    assert path.read_bytes() == written
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    fresh = StateStore(states._db)  # no cached body: read from the file
    stored = await fresh.read("lab")
    assert stored is not None
    assert stored.body == written
    assert (await fresh.read_version("lab", 1)).body == written


@sqlite_only
async def test_old_versions_take_their_files_with_them(db: Database, tmp_path: Path) -> None:
    """Retention, purge and delete remove the files of the versions they remove."""
    data_dir = tmp_path / "data"
    states = StateStore(db, history_limit=2)
    for serial in range(1, 5):
        await write(states, serial)
    assert len(files(data_dir)) == 2
    assert files(data_dir) == {name for _, _, name in rows(data_dir)}
    assert (await states.purge("lab")).removed == 1
    assert files(data_dir) == {name for _, _, name in rows(data_dir)}
    assert len(files(data_dir)) == 1
    await states.delete("lab", lock_id=None)
    assert files(data_dir) == set()


@sqlite_only
async def test_a_refused_write_leaves_no_file(states: StateStore, tmp_path: Path) -> None:
    await write(states, 1)
    before = files(tmp_path / "data")
    await states.lock("lab", LockInfo.parse(b'{"ID": "holder", "Operation": "OperationTypeApply"}'))
    with pytest.raises(StateLocked):
        await write(states, 2)
    assert files(tmp_path / "data") == before


@sqlite_only
async def test_a_body_swept_before_its_row_is_written_again(
    states: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep between a write's file and its transaction cannot lose the write: the writer
    looks for its file inside the transaction and writes it again."""
    monkeypatch.setattr(state_bodies, "ORPHAN_GRACE_SECONDS", -1.0)
    await write(states, 1)
    prepare = state_bodies.StateBodies.prepare

    async def prepare_then_sweep(self: state_bodies.StateBodies, data: bytes, md5: str) -> Any:
        new = await prepare(self, data, md5)
        assert await self.sweep() == 1  # the new file: no row names it yet
        return new

    monkeypatch.setattr(state_bodies.StateBodies, "prepare", prepare_then_sweep)
    written = await write(states, 2)
    assert files(tmp_path / "data") == {name for _, _, name in rows(tmp_path / "data")}
    stored = await StateStore(states._db).read("lab")
    assert stored is not None
    assert stored.body == written


@sqlite_only
async def test_the_sweep_removes_only_old_orphans(states: StateStore, tmp_path: Path) -> None:
    await write(states, 1)
    directory = tmp_path / "data" / BODY_DIR_NAME
    orphan, young, foreign = directory / ("a" * 32), directory / ("b" * 32), directory / "notes.txt"
    for path in (orphan, young, foreign):
        path.write_bytes(b"left by a crash")
    os.utime(orphan, (0, 0))
    os.utime(foreign, (0, 0))
    assert await states._files.sweep() == 1
    assert not orphan.exists()
    assert young.exists()
    assert foreign.exists()
    assert len(rows(tmp_path / "data")) == 1
    assert (await states.read("lab")) is not None


async def test_a_damaged_body_file_is_never_served(client: TestClient[Any, Any], tmp_path: Path) -> None:
    """Changed or missing under a kept version: a Status naming the damage, not the bytes."""
    for serial in (1, 2):
        assert (await client.post("/state/lab", data=body(serial), headers=AUTH)).status == 200
    data_dir = tmp_path / "server"
    first, second = (data_dir / BODY_DIR_NAME / name for _, _, name in rows(data_dir) if name)
    first.write_bytes(body(1)[:-1] + b" ")  # same size, other bytes
    second.unlink()
    for serial, damage in ((1, "does not match its row"), (2, "is missing")):
        answer = await client.get(f"/api/v1/projects/lab/states/{serial}", headers=AUTH)
        assert answer.status == 500
        message = (await answer.json())["message"]
        assert damage in message
        assert "restore the store from a backup" in message


def crash_script(data_dir: Path, crash_in: str) -> str:
    """Write serial 1, then serial 2 with the process killed (os._exit) at `crash_in`."""
    return textwrap.dedent(
        f"""
        import asyncio, os
        from pathlib import Path
        from api.store import StateStore, open_store, states, state_bodies
        from api.testing.tfstate import encode, vm_state
        from api.tfstate import extract_vms, parse_state

        def crash(*args, **kwargs):
            os._exit(137)

        async def main():
            db = await open_store(Path({str(data_dir)!r}), database_url=None)
            store = StateStore(db, history_limit=1)
            for serial in (1, 2):
                if serial == 2:
                    {crash_in} = crash
                document = vm_state(serial, {{"web": {{}}}})
                document["outputs"] = {{"password": {{"value": f"kept-{{serial}}", "type": "string"}}}}
                body = encode(document)
                summary = parse_state(body)
                await store.write("lab", body, summary, extract_vms(summary.document), lock_id=None)

        asyncio.run(main())
        """
    )


@pytest.mark.parametrize(
    ("crash_in", "current"),
    [
        pytest.param("states._insert_version", 1, id="file-written-row-not"),
        pytest.param("state_bodies.StateBodies.forget", 2, id="row-committed-pruned-file-not-removed"),
    ],
)
async def test_a_crash_loses_nothing_and_leaves_only_orphans(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, crash_in: str, current: int
) -> None:
    data_dir = tmp_path / "crashed"
    script = crash_script(data_dir, crash_in)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 137
    assert len(files(data_dir)) == 2  # the kept version's file and one no row names
    db = await open_store(data_dir, database_url=None, clock=clock)
    try:
        states = StateStore(db, history_limit=1)
        stored = await states.read("lab")
        assert stored is not None
        assert stored.serial == current
        assert f"kept-{current}".encode() in stored.body
        monkeypatch.setattr(state_bodies, "ORPHAN_GRACE_SECONDS", -1.0)
        assert await states._files.sweep() == 1
        assert files(data_dir) == {name for _, _, name in rows(data_dir)}
        assert not any(
            b"kept-" + str(3 - current).encode() in (data_dir / BODY_DIR_NAME / name).read_bytes()
            for name in files(data_dir)
        )
    finally:
        await db.close()


@sqlite_only
async def test_a_backup_holds_the_bodies_and_retries_a_pruned_file(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup is one file that needs no body file; a file pruned between its snapshot and
    its read makes it take a new snapshot."""
    states = StateStore(db)
    written = [await write(states, serial) for serial in (1, 2, 3)]
    load = body_files.BodyFiles.load
    calls: list[str] = []

    def pruned_once(self: body_files.BodyFiles, name: str, *, size: int, md5: str) -> bytes:
        calls.append(name)
        if len(calls) == 1:
            raise BodyMissing("pruned meanwhile")
        return load(self, name, size=size, md5=md5)

    monkeypatch.setattr(body_files.BodyFiles, "load", pruned_once)
    backup = await asyncio.to_thread(back_up, tmp_path / "data", tmp_path / "backup.sqlite3", force=False)
    assert len(calls) == 3 + 1
    monkeypatch.undo()
    fresh = tmp_path / "restored"
    await asyncio.to_thread(restore, backup.path, fresh, force=False, now=db.clock())
    assert [in_row for _, in_row, _ in rows(fresh)] == [len(data) for data in written]
    assert all(name is None for _, _, name in rows(fresh))
    restored = await open_store(fresh, database_url=None)
    try:
        assert [(await StateStore(restored).read_version("lab", s)).body for s in (1, 2, 3)] == written
    finally:
        await restored.close()


@sqlite_only
async def test_a_backup_of_a_store_missing_a_body_file_fails_clearly(
    states: StateStore, tmp_path: Path
) -> None:
    await write(states, 1)
    for path in (tmp_path / "data" / BODY_DIR_NAME).iterdir():
        path.unlink()
    with pytest.raises(Exception, match=r"body file .* is missing") as caught:
        await asyncio.to_thread(back_up, tmp_path / "data", tmp_path / "backup.sqlite3", force=False)
    assert isinstance(caught.value.__cause__, BodyDamaged)
    assert not (tmp_path / "backup.sqlite3").exists()


@sqlite_only
async def test_the_sweep_waits_a_minute_and_comes_back_every_ten(
    states: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/state-writes.md's numbers: orphans younger than 60 s stay; the sweep repeats every 600 s."""
    await write(states, 1)
    directory = tmp_path / "data" / BODY_DIR_NAME
    now = time.time()
    for name, age in (("c" * 32, 55.0), ("d" * 32, 65.0)):
        (directory / name).write_bytes(b"orphan")
        os.utime(directory / name, (now - age, now - age))
    slept: list[float] = []

    async def one_round(seconds: float) -> None:
        slept.append(seconds)
        raise asyncio.CancelledError

    monkeypatch.setattr(asyncio, "sleep", one_round)
    with pytest.raises(asyncio.CancelledError):
        await states.sweep_bodies_forever()
    assert slept == [600.0]
    assert (directory / ("c" * 32)).exists()
    assert not (directory / ("d" * 32)).exists()


@sqlite_only
async def test_a_backup_gives_up_after_five_snapshots(
    states: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await write(states, 1)
    attempts: list[str] = []

    def always_pruned(self: body_files.BodyFiles, name: str, *, size: int, md5: str) -> bytes:
        attempts.append(name)
        raise BodyMissing(f"the body file {name} of a kept state version is missing")

    monkeypatch.setattr(body_files.BodyFiles, "load", always_pruned)
    with pytest.raises(Exception, match="is missing"):
        await asyncio.to_thread(back_up, tmp_path / "data", tmp_path / "backup.sqlite3", force=False)
    assert len(attempts) == 5


@sqlite_only
async def test_a_read_racing_a_delete_reads_again(
    states: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET between a DELETE's commit and its row being read: no state, not a damaged store."""
    await write(states, 1)
    fresh = StateStore(states._db)
    load = state_bodies.StateBodies.load

    async def deleted_meanwhile(self: state_bodies.StateBodies, row: Any) -> bytes:
        monkeypatch.setattr(state_bodies.StateBodies, "load", load)
        await states.delete("lab", lock_id=None)
        return await load(self, row)

    monkeypatch.setattr(state_bodies.StateBodies, "load", deleted_meanwhile)
    assert await fresh.read("lab") is None
