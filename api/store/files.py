"""Files that hold states or secrets are readable only by the server's user.

The data dir holds the SQLite store (every kept state version, with whatever secrets Terraform
put in the state) and its -wal and -shm, which hold recent pages of it in clear; the VM runtime
dirs (QMP sockets, console logs, cloud-init seeds); the disks; and the image cache with its
partial downloads. The rules, close to PostgreSQL's for its data dir:

- a data dir writable by its group or by others is refused: another user could have planted a
  file or a symlink under a name the server is about to open;
- a data dir readable or searchable by others is tightened to 0700, with a warning;
- 0700 and 0750 are accepted as they are (0750 lets the group list names, nothing more: every
  file inside is 0600 and every directory 0700);
- the store files are created 0600, and made 0600 when an older version left them wider. SQLite
  gives -wal and -shm the main file's mode, so they follow.

Processes that serve or copy the store also run with umask 077 (controller/cli.py), so what they
and their children (QEMU, qemu-img) create is private without each caller asking.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PRIVATE_UMASK = 0o077
STORE_SIDECARS = ("-wal", "-shm", "-journal")
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH
_OPEN_TO_OTHERS = stat.S_IRWXO


class UnsafeDataDir(Exception):
    """The data dir is writable by other users; the message says how to fix it."""


def secure_data_dir(data_dir: Path) -> None:
    """Create `data_dir` (0700) if missing, refuse it if others may write it, tighten it to 0700
    if others may read it.

    :raise UnsafeDataDir: group- or world-writable, or not a directory.
    :raise OSError: it cannot be created or examined.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    status = data_dir.stat()
    if not stat.S_ISDIR(status.st_mode):
        raise UnsafeDataDir(f"the data dir {data_dir} is not a directory")
    mode = stat.S_IMODE(status.st_mode)
    if mode & _WRITABLE_BY_OTHERS:
        raise UnsafeDataDir(
            f"refusing the data dir {data_dir}: mode {mode:04o} lets other users write in it, where "
            f"the store keeps every state and its secrets; run `chmod 700 {data_dir}` (the server "
            "accepts 0700 or 0750)"
        )
    if mode & _OPEN_TO_OTHERS:
        try:
            os.chmod(data_dir, PRIVATE_DIR_MODE)
        except OSError as err:
            raise UnsafeDataDir(
                f"the data dir {data_dir} has mode {mode:04o}, readable by other users, and cannot be "
                f"tightened ({err.strerror}): chown it to uid {os.geteuid()} or chmod it 700"
            ) from err
        log.warning(
            "data_dir_tightened", data_dir=str(data_dir), was=f"{mode:04o}", now=f"{PRIVATE_DIR_MODE:04o}"
        )


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing; make it 0600 if it exists wider.

    O_NOFOLLOW: a symlink planted under the name is refused, never followed.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        _make_private(fd)
    finally:
        os.close(fd)


def make_store_files_private(database: Path) -> None:
    """Make the store file and whichever of its -wal, -shm and -journal exist mode 0600.

    Only before SQLite opens the store in this process: see keep_open_store_files_private.
    """
    create_private_file(database)
    for sidecar in _sidecars(database):
        try:
            fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            _make_private(fd)
        finally:
            os.close(fd)


def keep_open_store_files_private(database: Path) -> None:
    """Make the open store's files 0600 by their names, never opening them.

    SQLite holds POSIX locks on the store and its -shm while it is open, and those locks belong
    to the process: closing any descriptor of one of these files, even one opened just to fchmod
    it, drops them all. Another process would then take itself for the store's only user, reset
    the -shm under the server's mapping and kill it with SIGBUS (tests/component/test_store_locks.py).
    """
    for path in (database, *_sidecars(database)):
        try:
            status = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(status.st_mode) and stat.S_IMODE(status.st_mode) != PRIVATE_FILE_MODE:
            os.chmod(path, PRIVATE_FILE_MODE)


def _sidecars(database: Path) -> list[Path]:
    return [database.with_name(database.name + suffix) for suffix in STORE_SIDECARS]


def _make_private(fd: int) -> None:
    if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
        os.fchmod(fd, PRIVATE_FILE_MODE)
