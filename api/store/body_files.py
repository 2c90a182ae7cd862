"""State version bodies as files beside the SQLite store (docs/state-writes.md#bodies-as-files).

A 1 MiB body kept in SQLite is written three times (into the WAL, into the B-tree at the
checkpoint, and as zeroes by secure_delete when it is pruned), page by page through SQLite's
pager; as a file it is written once, with one write and one fsync, outside the store's write
lock. The row keeps the file's name, the body's size and its MD5.

Invariants:
- A file is whole and durable before a row names it: written, fsynced, and its directory entry
  fsynced, before the transaction that inserts the row commits. A crash at any point leaves no
  row (the file is an orphan) or a row whose file is whole.
- A file is removed only after the transaction that removed its row committed. A crash in
  between leaves an orphan, never a row without its file.
- Orphans (files no row names) are removed by `sweep`, inside a write transaction, so a writer
  that checks its file inside its own transaction (`StateBodies.keep`) can never lose it.
- Names are 128 random bits, never derived from the body: no two bodies share a file, so no
  file is counted by references, and nothing a client sends chooses a name.
- Files are 0600 in a 0700 directory, opened with O_NOFOLLOW; a read checks size and MD5.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from api.store.errors import StorageFull, StoreError
from api.store.files import PRIVATE_FILE_MODE, secure_data_dir

BODY_DIR_NAME = "state-bodies"
# A name this module made: anything else in the directory is left alone.
_NAME_RE = re.compile(r"[0-9a-f]{32}")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class BodyDamaged(StoreError):
    """A kept version's body file differs from its row, or is missing. Restore from a backup."""


class BodyMissing(BodyDamaged):
    """A kept version's body file is missing: damage, or a version removed since its row was read."""


class BodyFiles:
    """The directory of body files. Blocking: call from a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._checked = False

    def create(self, body: bytes) -> str:
        """Write `body` to a new file, durably; its name. The directory is made (0700) or checked
        at the first call.

        :raise StorageFull: the disk is full (nothing is left behind).
        :raise UnsafeDataDir: the directory is writable by other users.
        """
        if not self._checked:
            secure_data_dir(self.directory)
            self._checked = True
        return self._create(body)

    def _create(self, body: bytes) -> str:
        name = secrets.token_hex(16)
        path = self.directory / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, PRIVATE_FILE_MODE)
            try:
                _write_all(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync_directory()
        except OSError as err:
            path.unlink(missing_ok=True)
            if err.errno in _FULL:
                raise StorageFull("the data dir is full; the write was not stored") from err
            raise
        return name

    def exists(self, name: str) -> bool:
        return os.path.lexists(self._path(name))

    def load(self, name: str, *, size: int, md5: str) -> bytes:
        """The body in file `name`, checked against the size and MD5 its row holds.

        :raise BodyDamaged: the file is missing, or its size or MD5 differ.
        """
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise BodyMissing(f"the body file {name} of a kept state version is missing") from err
        with os.fdopen(fd, "rb") as stream:
            body = stream.read(size + 1)
        if len(body) != size or hashlib.md5(body, usedforsecurity=False).hexdigest() != md5:
            raise BodyDamaged(f"the body file {name} of a kept state version does not match its row")
        return body

    def remove(self, names: Iterable[str]) -> int:
        """Remove these files (those already gone are skipped); how many were removed."""
        removed = 0
        for name in names:
            try:
                os.unlink(self._path(name))
                removed += 1
            except FileNotFoundError:
                continue
        if removed:
            self._sync_directory()
        return removed

    def unreferenced(self, referenced: set[str], *, older_than: float) -> list[str]:
        """Names of files that no row names and that were last changed over `older_than`
        seconds ago (a younger one may belong to a write whose row is not committed yet)."""
        cutoff = time.time() - older_than
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not _NAME_RE.fullmatch(entry.name) or entry.name in referenced:
                    continue
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    found.append(entry.name)
        return found

    def _path(self, name: str) -> Path:
        if not _NAME_RE.fullmatch(name):
            raise BodyDamaged(f"a kept state version names the body file {name!r}, not one this store made")
        return self.directory / name

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, body: bytes) -> None:
    view = memoryview(body)
    while view:
        view = view[os.write(fd, view) :]


def inline_bodies(connection: sqlite3.Connection, files: BodyFiles) -> int:
    """Put every body kept as a file back into its row, in a copy of the store (a backup, a store
    kept aside by a restore), so that the copy is whole on its own; how many. Oldest first: those
    are the ones a live server prunes first.

    :raise BodyMissing, BodyDamaged: a named file is gone or differs from its row.
    """
    columns = {row[1] for row in connection.execute("PRAGMA table_info(state_versions)")}
    if "body_file" not in columns:
        return 0
    rows = connection.execute(
        "SELECT id, body_file, size, md5 FROM state_versions WHERE body_file IS NOT NULL ORDER BY id"
    ).fetchall()
    connection.execute("BEGIN IMMEDIATE")
    try:
        for version, name, size, md5 in rows:
            body = files.load(name, size=size, md5=md5)
            connection.execute(
                "UPDATE state_versions SET body = ?, body_file = NULL WHERE id = ?", (body, version)
            )
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    return len(rows)
