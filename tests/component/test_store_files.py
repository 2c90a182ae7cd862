"""Files holding states are readable only by the server's user (api/store/files.py): the data dir,
the store with its -wal and -shm, and backups, whatever the umask and the dir's mode before."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.store import StateStore, open_database
from api.store.backup import back_up
from api.store.db import DB_FILE_NAME
from api.store.files import UnsafeDataDir
from api.testing.tfstate import encode, vm_state
from api.tfstate import extract_vms, parse_state

STORE_FILES = (DB_FILE_NAME, f"{DB_FILE_NAME}-wal", f"{DB_FILE_NAME}-shm")


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """umask 022, as a shell gives: files would be 0644 unless the store makes them private."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(data_dir: Path) -> dict[str, int]:
    return {name: mode(data_dir / name) for name in STORE_FILES}


async def write_a_state(data_dir: Path) -> None:
    """Open the store, write a state (so the WAL holds its body), and keep the store open while
    the caller looks: -wal and -shm exist only while a connection is open."""
    body = encode(vm_state(1, {"web": {}}))
    summary = parse_state(body)
    database = await open_database(data_dir)
    try:
        await StateStore(database).write("lab", body, summary, extract_vms(summary.document), lock_id=None)
        assert (data_dir / f"{DB_FILE_NAME}-wal").stat().st_size > 0
        assert modes(data_dir) == dict.fromkeys(STORE_FILES, 0o600)
    finally:
        await database.close()


async def test_a_pre_existing_0755_dir_is_tightened_and_the_store_files_are_0600(tmp_path: Path) -> None:
    """`mkdir` before the first start gives 0755: the dir becomes 0700, and the store, its -wal
    and its -shm are 0600 (not the 0644 SQLite would create under umask 022)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    assert mode(data_dir) == 0o755
    await write_a_state(data_dir)
    assert mode(data_dir) == 0o700


async def test_a_new_data_dir_is_0700(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    await write_a_state(data_dir)
    assert mode(data_dir) == 0o700


async def test_a_0750_dir_is_accepted_as_it_is(tmp_path: Path) -> None:
    """Group may list names, as PostgreSQL allows; the files inside stay 0600."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o750)
    await write_a_state(data_dir)
    assert mode(data_dir) == 0o750


@pytest.mark.parametrize("dir_mode", [0o777, 0o770, 0o1777, 0o720, 0o702], ids=oct)
async def test_a_dir_others_can_write_is_refused_and_left_alone(tmp_path: Path, dir_mode: int) -> None:
    """Someone else could have planted files there: refused, with the fix in the message; no
    store is created and the mode is not changed behind the operator's back."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(dir_mode)
    with pytest.raises(UnsafeDataDir, match=f"mode {dir_mode:04o} lets other users write.*chmod 700"):
        await open_database(data_dir)
    assert list(data_dir.iterdir()) == []
    assert mode(data_dir) == dir_mode


async def test_a_store_left_0644_by_an_older_version_is_made_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    await write_a_state(data_dir)
    (data_dir / DB_FILE_NAME).chmod(0o644)
    wal = data_dir / f"{DB_FILE_NAME}-wal"
    wal.touch()
    wal.chmod(0o644)
    await write_a_state(data_dir)


async def test_a_symlink_planted_as_the_store_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    (data_dir / DB_FILE_NAME).symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        await open_database(data_dir)
    assert not target.exists()


async def test_a_backup_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """`tofu-qemu backup` writes every state to FILE: it is the server's user's alone."""
    data_dir = tmp_path / "data"
    await write_a_state(data_dir)
    backup = tmp_path / "backups" / "store.sqlite3"
    backup.parent.mkdir()
    back_up(data_dir, backup, force=False)
    assert mode(backup) == 0o600
    with sqlite3.connect(backup) as connection:
        assert connection.execute("SELECT count(*) FROM state_versions").fetchone() == (1,)
