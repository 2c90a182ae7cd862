"""Backup and restore of the store (api/store/backup.py) on real SQLite files, and the CLI around them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from api.store import Database, StateStore
from api.store.backup import (
    SCHEMA_VERSION,
    DataDirInUse,
    NewerSchema,
    NotAStore,
    TargetExists,
    back_up,
    hold_data_dir,
    restore,
)
from api.store.body_files import BODY_DIR_NAME
from api.store.db import DB_FILE_NAME
from api.testing.tfstate import encode, vm_state
from api.tfstate import extract_vms, parse_state
from controller.cli import main

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
BACKUPS_DURING_WRITES = 5


@pytest.fixture
def database_url() -> None:
    """Backup and restore copy the SQLite file. On PostgreSQL they refuse and point to pg_dump
    (tests/component/test_postgres_store.py)."""
    return


@pytest.fixture
def data_dir(db: Database, tmp_path: Path) -> Path:
    """The data dir of the `db` fixture's open store."""
    return tmp_path / "data"


async def write(states: StateStore, serial: int, vm_names: tuple[str, ...] = ("web",)) -> None:
    body = encode(vm_state(serial, {name: {} for name in vm_names}))
    summary = parse_state(body)
    await states.write("lab", body, summary, extract_vms(summary.document), lock_id=None)


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(path)
    try:
        yield connection
    finally:
        connection.close()


def versions(path: Path) -> dict[int, tuple[str, bytes]]:
    """Each version's MD5 and body, wherever the store keeps it: its row or its body file."""
    with connect(path) as connection:
        rows = connection.execute("SELECT id, md5, body, body_file FROM state_versions").fetchall()
    files = path.parent / BODY_DIR_NAME
    return {
        id_: (md5, body if name is None else (files / name).read_bytes()) for id_, md5, body, name in rows
    }


def body_files_named(path: Path) -> int:
    with connect(path) as connection:
        (count,) = connection.execute("SELECT count(body_file) FROM state_versions").fetchone()
    return int(count)


def current_version(path: Path) -> int:
    with connect(path) as connection:
        (current,) = connection.execute("SELECT current_version FROM projects WHERE name = 'lab'").fetchone()
        return int(current)


async def test_backup_while_a_writer_commits_is_one_consistent_snapshot(db: Database, data_dir: Path) -> None:
    """Backups taken during a stream of commits each hold a whole prefix of them, intact."""
    states = StateStore(db, history_limit=1000)
    await write(states, 1)
    stop = asyncio.Event()

    async def keep_writing() -> None:
        serial = 1
        while not stop.is_set():
            serial += 1
            await write(states, serial)

    copies = []
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(keep_writing())
        try:
            for number in range(BACKUPS_DURING_WRITES):
                file = data_dir.parent / f"backup-{number}.sqlite3"
                copies.append(await asyncio.to_thread(back_up, data_dir, file, force=False))
        finally:
            stop.set()
    assert len({copy.contents.state_versions for copy in copies}) > 1, "commits landed between the backups"

    live = versions(data_dir / DB_FILE_NAME)
    for copy in copies:
        copied = versions(copy.path)
        # A prefix of the commits: each copied row is the live row, and the project points at the
        # newest copied version (both change in one transaction).
        assert copied, copy
        assert all(live[id_] == row for id_, row in copied.items())
        assert current_version(copy.path) == max(copied)
        assert copy.contents.state_versions == len(copied)
        assert copy.sha256 == hashlib.sha256(copy.path.read_bytes()).hexdigest()


async def test_backup_is_one_file_and_leaves_no_temp_files(db: Database, data_dir: Path) -> None:
    """The backup needs no -wal beside it, and only FILE is added to its directory."""
    await write(StateStore(db), 1)
    target_dir = data_dir.parent / "backups"
    target_dir.mkdir()

    result = back_up(data_dir, target_dir / "store.sqlite3", force=False)

    assert sorted(p.name for p in target_dir.iterdir()) == ["store.sqlite3"]
    with connect(result.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert (result.contents.projects, result.contents.state_versions, len(result.contents.vm_uids)) == (
        1,
        1,
        1,
    )


async def test_backup_refuses_to_overwrite_a_file_unless_forced(db: Database, data_dir: Path) -> None:
    """An existing FILE is left alone without force, and replaced with it."""
    file = data_dir.parent / "backup.sqlite3"
    file.write_bytes(b"precious")

    with pytest.raises(TargetExists, match="pass --force"):
        back_up(data_dir, file, force=False)
    assert file.read_bytes() == b"precious"

    back_up(data_dir, file, force=True)
    assert file.read_bytes().startswith(b"SQLite format 3\0")


def test_backup_without_a_store_is_refused(tmp_path: Path) -> None:
    """A data dir with no store is named in the refusal, and no file is written."""
    with pytest.raises(NotAStore, match="no tofu-qemu store"):
        back_up(tmp_path / "empty", tmp_path / "backup.sqlite3", force=False)
    assert not (tmp_path / "backup.sqlite3").exists()


async def test_restore_refuses_a_newer_schema(db: Database, data_dir: Path, tmp_path: Path) -> None:
    """A backup from a newer tofu-qemu is refused before the data dir is touched."""
    file = back_up(data_dir, tmp_path / "backup.sqlite3", force=False).path
    with connect(file) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    target = tmp_path / "other"

    with pytest.raises(NewerSchema, match=f"schema version {SCHEMA_VERSION + 1}"):
        restore(file, target, force=True, now=NOW)
    assert not target.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a database at all, just some bytes" * 200, "empty-sqlite"],
    ids=["empty", "garbage", "another-sqlite-db"],
)
def test_restore_refuses_a_file_that_is_not_a_store(tmp_path: Path, content: bytes | str) -> None:
    """Garbage, an empty file or some other SQLite database is not restored."""
    file = tmp_path / "backup.sqlite3"
    if content == "empty-sqlite":
        with connect(file) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
    else:
        assert isinstance(content, bytes)
        file.write_bytes(content)

    with pytest.raises(NotAStore):
        restore(file, tmp_path / "data", force=True, now=NOW)
    assert not (tmp_path / "data" / DB_FILE_NAME).exists()


async def test_restore_refuses_while_a_process_holds_the_data_dir(
    db: Database, data_dir: Path, tmp_path: Path
) -> None:
    """A serving process's shared lock makes restore refuse, and the store stays as it was."""
    file = back_up(data_dir, tmp_path / "backup.sqlite3", force=False).path
    await write(StateStore(db), 1)
    before = versions(data_dir / DB_FILE_NAME)

    with hold_data_dir(data_dir, exclusive=False), pytest.raises(DataDirInUse, match="stop it first"):
        restore(file, data_dir, force=True, now=NOW)
    assert versions(data_dir / DB_FILE_NAME) == before


def test_no_process_starts_serving_during_a_restore(tmp_path: Path) -> None:
    """The shared lock a server takes at start is refused while a restore holds the data dir."""
    with (
        hold_data_dir(tmp_path, exclusive=True),
        pytest.raises(DataDirInUse, match="restore is in progress"),
        hold_data_dir(tmp_path, exclusive=False),
    ):
        pass


def test_servers_share_the_data_dir(tmp_path: Path) -> None:
    """`api` and `controller` on one data dir both hold the shared lock."""
    with hold_data_dir(tmp_path, exclusive=False), hold_data_dir(tmp_path, exclusive=False):
        pass


async def test_restore_into_an_existing_store_needs_force(
    db: Database, data_dir: Path, tmp_path: Path
) -> None:
    """Without force, a data dir that has a store keeps it."""
    file = back_up(data_dir, tmp_path / "backup.sqlite3", force=False).path
    await write(StateStore(db), 1)

    with pytest.raises(TargetExists, match="pass --force"):
        restore(file, data_dir, force=False, now=NOW)
    assert len(versions(data_dir / DB_FILE_NAME)) == 1


async def test_restore_keeps_the_previous_store_beside_the_restored_one(
    db: Database, data_dir: Path, tmp_path: Path
) -> None:
    """The replaced store is kept as .before-restore-<UTC time> with its later writes; the new one
    holds exactly the backup, with no stale -wal or -shm beside it."""
    states = StateStore(db)
    await write(states, 1)
    file = back_up(data_dir, tmp_path / "backup.sqlite3", force=False).path
    await write(states, 2, ("web", "db"))
    await db.close()  # a stopped server; the fixture's second close is harmless

    restored = restore(file, data_dir, force=True, now=NOW)

    assert restored.previous == data_dir / f"{DB_FILE_NAME}.before-restore-20261121T120000Z"
    assert len(versions(restored.previous)) == 2
    # The kept store holds its bodies in its rows: whole once the sweep removes the body files.
    assert body_files_named(restored.previous) == 0
    assert versions(restored.database) == versions(file)
    assert sorted(p.name for p in data_dir.iterdir()) == [
        BODY_DIR_NAME,
        "tofu-qemu.lock",
        DB_FILE_NAME,
        restored.previous.name,
    ]


def test_restore_keeps_commits_still_in_the_previous_stores_wal(tmp_path: Path) -> None:
    """A store left by a killed server (commits only in its -wal) is kept whole, and its WAL is
    not replayed onto the restored file."""
    source = tmp_path / "source"
    source.mkdir()
    backup_file = tmp_path / "backup.sqlite3"
    with connect(source / DB_FILE_NAME) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        connection.execute("CREATE TABLE projects (name TEXT)")
        connection.execute("CREATE TABLE state_versions (id INTEGER)")
        connection.execute("CREATE TABLE vms (uid TEXT)")
        connection.execute("PRAGMA user_version = 1")
        connection.commit()
        back_up(source, backup_file, force=False)
        connection.execute("INSERT INTO projects VALUES ('only-in-the-wal')")
        connection.commit()
        # What kill -9 leaves: the file and its WAL, copied while the writer still has them open.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for suffix in ("", "-wal"):
            shutil.copy(source / (DB_FILE_NAME + suffix), crashed / (DB_FILE_NAME + suffix))

    restored = restore(backup_file, crashed, force=True, now=NOW)

    assert restored.previous is not None
    with connect(restored.previous) as connection:
        assert connection.execute("SELECT name FROM projects").fetchall() == [("only-in-the-wal",)]
    with connect(restored.database) as connection:
        assert connection.execute("SELECT name FROM projects").fetchall() == []
    assert not (crashed / f"{DB_FILE_NAME}-wal").exists()


async def test_cli_backup_then_restore_round_trip(
    db: Database, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`backup` prints a JSON summary of FILE; `restore` into a fresh dir gives the same bytes of state."""
    await write(StateStore(db), 7)
    file = tmp_path / "backup.sqlite3"

    assert main(["backup", str(file), "--data-dir", str(data_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (summary["file"], summary["bytes"]) == (str(file), file.stat().st_size)
    assert (summary["projects"], summary["state_versions"], summary["vms"]) == (1, 1, 1)

    fresh = tmp_path / "fresh"
    assert main(["restore", str(file), "--data-dir", str(fresh)]) == 0
    restored = json.loads(capsys.readouterr().out)
    assert restored["previous"] is None
    assert versions(fresh / DB_FILE_NAME) == versions(data_dir / DB_FILE_NAME)


def test_cli_refusals_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused command exits 2 and says why on one line of stderr."""
    file = tmp_path / "backup.sqlite3"
    file.write_bytes(b"junk")

    assert main(["restore", str(file), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"tofu-qemu: {file} is not an intact SQLite database")


def test_cli_data_dir_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TOFU_QEMU_DATA_DIR names the data dir when --data-dir is not given."""
    monkeypatch.setenv("TOFU_QEMU_DATA_DIR", str(tmp_path / "from-env"))
    monkeypatch.delenv("TOFU_QEMU_CONFIG", raising=False)

    assert main(["backup", str(tmp_path / "backup.sqlite3")]) == 2
    assert f"no tofu-qemu store at {tmp_path / 'from-env' / DB_FILE_NAME}" in capsys.readouterr().err


def test_restore_removes_a_stale_wal_left_without_its_store(tmp_path: Path) -> None:
    """A -wal whose store was deleted is removed, not replayed onto the restored file."""
    data = tmp_path / "data"
    data.mkdir()
    with connect(data / DB_FILE_NAME) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA wal_autocheckpoint = 0")
        for table in ("projects (name TEXT)", "state_versions (id INTEGER)", "vms (uid TEXT)"):
            connection.execute(f"CREATE TABLE {table}")
        connection.execute("PRAGMA user_version = 1")
        connection.commit()
        backup_file = back_up(data, tmp_path / "backup.sqlite3", force=False).path
        connection.execute("INSERT INTO projects VALUES ('only-in-the-wal')")
        connection.commit()
        shutil.copy(data / f"{DB_FILE_NAME}-wal", tmp_path / "stale-wal")
    (data / DB_FILE_NAME).unlink()
    shutil.copy(tmp_path / "stale-wal", data / f"{DB_FILE_NAME}-wal")

    restored = restore(backup_file, data, force=False, now=NOW)

    assert restored.previous is None
    with connect(restored.database) as connection:
        connection.execute("PRAGMA journal_mode = WAL")  # as the server opens it
        assert connection.execute("SELECT name FROM projects").fetchall() == []


@pytest.mark.parametrize("name", [DB_FILE_NAME, f"{DB_FILE_NAME}-wal"])
async def test_backup_never_replaces_the_live_store(db: Database, data_dir: Path, name: str) -> None:
    """Even with force, FILE may not be the store or its WAL, which the server has open."""
    await write(StateStore(db), 1)
    before = versions(data_dir / DB_FILE_NAME)

    with pytest.raises(TargetExists, match="part of the live store"):
        back_up(data_dir, data_dir / name, force=True)
    assert versions(data_dir / DB_FILE_NAME) == before
