"""Online backup and offline restore of the store, and the data dir lock that keeps them apart.

Invariants:
- A backup is one consistent snapshot: SQLite's backup API copies every page inside one read
  transaction of a read-only connection. In WAL mode that reader never blocks the server's writers
  and never sees half a transaction; the source file is never written.
- A backup file is complete or absent: it is written under a temp name beside FILE, switched to
  rollback-journal mode (one self-contained file, no -wal beside it), integrity-checked, fsynced
  and renamed.
- Every `tofu-qemu` process that serves a data dir holds a shared flock on DATA/tofu-qemu.lock for
  its whole life (controller/cli.py). Restore takes it exclusively without waiting, so it never
  replaces the store under a running process and no process starts during a restore.
- Restore never leaves the data dir without a store: the previous file stays in place (and is kept
  as a hard link, tofu-qemu.sqlite3.before-restore-<UTC time>) until the new one is renamed over it.
  Its -wal is folded in or removed first, because SQLite would replay a stale WAL onto the new file.
- A backup is one self-contained file: the bodies the store keeps as files (api/store/body_files.py)
  are put back into their rows in the copy. A file pruned between the snapshot and its read makes
  the copy start again from a new snapshot (oldest versions, the ones pruned first, are read first).
- A store kept aside by a restore gets its body files put back into its rows first, so it stays
  whole once the sweep removes the files that the restored store does not name.
- Only the store is backed up. Runtime dirs (DATA/run), disks and images are not touched: a VM
  still running after a restore is adopted by the next start if the restored store declares it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from api.store.body_files import BODY_DIR_NAME, BodyDamaged, BodyFiles, BodyMissing, inline_bodies
from api.store.db import BUSY_TIMEOUT_MS, DB_FILE_NAME
from api.store.schema import MIGRATIONS

# Never deleted: a process holding a lock on an unlinked inode would exclude nobody.
LOCK_FILE_NAME = "tofu-qemu.lock"
SCHEMA_VERSION = len(MIGRATIONS)
_REQUIRED_TABLES = frozenset({"projects", "state_versions", "vms"})
_SIDECARS = ("-wal", "-shm", "-journal")
# Snapshots taken before a backup gives up on body files pruned under it.
COPY_ATTEMPTS = 5


class Refused(Exception):
    """Base class: the operation was refused and nothing was changed. The message says what to do."""


class DataDirInUse(Refused):
    """Another tofu-qemu process holds the data dir (a server, or a restore). Stop it or wait, then retry."""


class NotAStore(Refused):
    """The file is missing, not SQLite, damaged, or not a tofu-qemu store. Pick another file."""


class NewerSchema(Refused):
    """The store was written by a newer tofu-qemu; restore it with that version."""


class TargetExists(Refused):
    """The destination exists; pass --force to replace it."""


@dataclass(frozen=True, slots=True)
class StoreContents:
    schema_version: int
    projects: int
    state_versions: int
    vm_uids: frozenset[str]


@dataclass(frozen=True, slots=True)
class BackupFile:
    path: Path
    size: int
    sha256: str
    contents: StoreContents

    def summary(self) -> dict[str, object]:
        return {
            "file": str(self.path),
            "bytes": self.size,
            "sha256": self.sha256,
            "schema_version": self.contents.schema_version,
            "projects": self.contents.projects,
            "state_versions": self.contents.state_versions,
            "vms": len(self.contents.vm_uids),
        }


@dataclass(frozen=True, slots=True)
class Restored:
    backup: BackupFile
    database: Path
    previous: Path | None  # the store it replaced, kept beside it; None if there was none

    def summary(self) -> dict[str, object]:
        return {
            **self.backup.summary(),
            "restored_to": str(self.database),
            "previous": None if self.previous is None else str(self.previous),
        }


@contextlib.contextmanager
def hold_data_dir(data_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the data dir's lock: shared while serving (api and controller may share a data dir),
    exclusive while restoring. Never waits.

    :raise DataDirInUse: a holder of the other kind has it.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_CLOEXEC: QEMU children must not inherit the lock, or every restore would be refused for
    # as long as any VM runs.
    fd = os.open(data_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError as err:
            if exclusive:
                raise DataDirInUse(f"a tofu-qemu process is using {data_dir}; stop it first") from err
            raise DataDirInUse(f"a restore is in progress on {data_dir}; start once it has finished") from err
        yield
    finally:
        os.close(fd)  # releases the lock


def back_up(data_dir: Path, file: Path, *, force: bool) -> BackupFile:
    """Copy the store in `data_dir` to `file`, consistently even while a server writes to it.

    :raise NotAStore: there is no store in `data_dir`, or its copy is damaged.
    :raise TargetExists: `file` exists and not `force`, or `file` is part of the live store.
    :raise OSError, sqlite3.Error: the copy failed (disk full, busy past the timeout, ...).
    """
    source = data_dir / DB_FILE_NAME
    if not source.is_file():
        raise NotAStore(f"no tofu-qemu store at {source}")
    if _is_part_of(file, source):
        raise TargetExists(f"{file} is part of the live store; back it up to another file")
    if file.exists() and not force:
        raise TargetExists(f"{file} exists; pass --force to replace it")
    for attempt in range(1, COPY_ATTEMPTS + 1):
        try:
            with _temp_file_beside(file) as temp:
                contents = _copy_store(source, temp)
                os.replace(temp, file)
            break
        except NotAStore as err:
            # A body file pruned after the snapshot was taken: the next snapshot no longer names it.
            if not isinstance(err.__cause__, BodyMissing) or attempt == COPY_ATTEMPTS:
                raise
    _fsync(file.parent)
    return _described(file, contents)


def restore(file: Path, data_dir: Path, *, force: bool, now: datetime) -> Restored:
    """Replace the store in `data_dir` with the backup `file`; VM runtime dirs are left alone.

    :raise NotAStore: `file` is not an intact tofu-qemu store.
    :raise NewerSchema: `file` comes from a newer tofu-qemu.
    :raise DataDirInUse: a tofu-qemu process runs on `data_dir`.
    :raise TargetExists: `data_dir` has a store and not `force`.
    :raise OSError, sqlite3.Error: the copy or a rename failed; the previous store is still in place.
    """
    backup = inspect_backup(file)  # before locking anything: a bad file is refused the same way always
    with hold_data_dir(data_dir, exclusive=True):
        target = data_dir / DB_FILE_NAME
        if target.exists() and not force:
            raise TargetExists(f"{target} exists; pass --force to replace it (it is kept beside the new one)")
        with _temp_file_beside(target) as temp:
            _copy_store(file, temp)
            previous = _keep_previous(target, now=now) if target.exists() else None
            if previous is not None:
                _inline_into(previous, BodyFiles(data_dir / BODY_DIR_NAME))
            _remove_sidecars(target)
            os.replace(temp, target)
        _fsync(data_dir)
    return Restored(backup, target, previous)


def inspect_backup(file: Path) -> BackupFile:
    """Check that `file` is an intact tofu-qemu store this version can run; change nothing.

    :raise NotAStore, NewerSchema: as the messages say.
    """
    if not file.is_file():
        raise NotAStore(f"no backup file at {file}")
    with _not_a_store_on_sqlite_damage(file), contextlib.closing(_connect_read_only(file)) as connection:
        _check_integrity(connection, file)
        contents = _read_contents(connection, file)
    if contents.schema_version > SCHEMA_VERSION:
        raise NewerSchema(
            f"{file} has schema version {contents.schema_version}, newer than this tofu-qemu's "
            f"{SCHEMA_VERSION}; restore it with the tofu-qemu that wrote it"
        )
    return _described(file, contents)


def _copy_store(source: Path, destination: Path) -> StoreContents:
    """Copy one consistent snapshot of `source` into the empty file `destination`, check it and
    make it durable."""
    with (
        _not_a_store_on_sqlite_damage(source),
        contextlib.closing(_connect_read_only(source)) as reader,
        contextlib.closing(sqlite3.connect(destination, isolation_level=None)) as writer,
    ):
        # pages=-1: every page in one step, so one read transaction sees one commit.
        reader.backup(writer, pages=-1)
        try:
            inline_bodies(writer, BodyFiles(source.parent / BODY_DIR_NAME))
        except BodyDamaged as err:
            raise NotAStore(f"{source}: {err}") from err
        # The copied header says WAL, like the source's; a backup should be one file, and the
        # server switches a restored store back to WAL when it opens it.
        writer.execute("PRAGMA journal_mode = DELETE")
        _check_integrity(writer, source)
        contents = _read_contents(writer, source)
    _fsync(destination)
    return contents


def _connect_read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: a read-only connection cannot write the source, even by mistake.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)


def _check_integrity(connection: sqlite3.Connection, label: Path) -> None:
    problems = [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        raise NotAStore(f"{label} fails SQLite's integrity check: {'; '.join(problems[:3])}")


def _read_contents(connection: sqlite3.Connection, label: Path) -> StoreContents:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version < 1 or not _REQUIRED_TABLES.issubset(tables):
        raise NotAStore(f"{label} is an SQLite database but not a tofu-qemu store")
    (projects,) = connection.execute("SELECT count(*) FROM projects").fetchone()
    (versions,) = connection.execute("SELECT count(*) FROM state_versions").fetchone()
    uids = frozenset(row[0] for row in connection.execute("SELECT uid FROM vms"))
    return StoreContents(int(version), int(projects), int(versions), uids)


@contextlib.contextmanager
def _not_a_store_on_sqlite_damage(path: Path) -> Iterator[None]:
    """Turn SQLite's "not a database" and "malformed" into NotAStore; other errors (busy, I/O)
    stay what they are."""
    try:
        yield
    except sqlite3.DatabaseError as err:
        if getattr(err, "sqlite_errorcode", None) in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            raise NotAStore(f"{path} is not an intact SQLite database: {err}") from err
        raise


def _keep_previous(database: Path, *, now: datetime) -> Path:
    """Keep the store about to be replaced as a hard link beside it; the original stays in place."""
    _fold_wal(database)
    kept = _unused_path(database.with_name(f"{database.name}.before-restore-{now:%Y%m%dT%H%M%SZ}"))
    os.link(database, kept)
    wal = _sidecar(database, "-wal")
    if wal.exists():
        # Folding failed (a damaged store): keep its WAL under the name SQLite pairs with the copy.
        os.link(wal, _sidecar(kept, "-wal"))
    return kept


def _inline_into(database: Path, files: BodyFiles) -> None:
    """Put the bodies `database` keeps as files into its rows, and fold its WAL back in.

    :raise NotAStore: a body file is missing or damaged; the restore stops, nothing replaced.
    """
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as connection:
        try:
            inline_bodies(connection, files)
        except BodyDamaged as err:
            raise NotAStore(f"the store about to be replaced, {database}: {err}") from err
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _fold_wal(database: Path) -> None:
    """Checkpoint the store's WAL into its file, so the kept copy is one complete file.

    Best effort: a damaged store may refuse, and then its WAL is kept beside the copy instead.
    """
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(database, isolation_level=None)) as connection,
    ):
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _remove_sidecars(database: Path) -> None:
    # A stale -wal or -journal would be replayed onto the new file and corrupt it.
    for suffix in _SIDECARS:
        _sidecar(database, suffix).unlink(missing_ok=True)


def _is_part_of(file: Path, database: Path) -> bool:
    """Whether `file` is the store file or one of its -wal, -shm and -journal files."""
    parts = {database.resolve(), *(_sidecar(database, suffix).resolve() for suffix in _SIDECARS)}
    return file.resolve() in parts


def _sidecar(database: Path, suffix: str) -> Path:
    return database.with_name(database.name + suffix)


def _unused_path(path: Path) -> Path:
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


@contextlib.contextmanager
def _temp_file_beside(path: Path) -> Iterator[Path]:
    """An empty private (0600) file in `path`'s directory, removed unless renamed away."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    finally:
        for leftover in (temp, *(_sidecar(temp, suffix) for suffix in _SIDECARS)):
            leftover.unlink(missing_ok=True)


def _described(file: Path, contents: StoreContents) -> BackupFile:
    with file.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    return BackupFile(file, file.stat().st_size, digest, contents)


def _fsync(path: Path) -> None:
    """fsync a file, or a directory to make the renames in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
