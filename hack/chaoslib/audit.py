"""The store and the leak audit: what one look at the data dir finds that no object accounts for."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import server_layout

from api.store.db import DB_FILE_NAME
from chaoslib.basics import HTTP_TIMEOUT_S, UNKNOWN_VM
from chaoslib.processes import qemus_by_uid


def read_store(db_path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(objects as (uid, deleted_at, status), port rows, disk rows), read-only (WAL: safe beside
    a writer)."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=HTTP_TIMEOUT_S)
    try:
        objects = connection.execute("SELECT uid, deleted_at, status FROM vms").fetchall()
        ports = connection.execute(
            "SELECT uid, protocol, guest_port, host_port FROM port_allocations ORDER BY uid"
        ).fetchall()
        disks = connection.execute("SELECT uid, name, path FROM disks ORDER BY uid").fetchall()
        return objects, ports, disks
    finally:
        connection.close()


def integrity_check(db_path: Path) -> str:
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=HTTP_TIMEOUT_S)
    try:
        return "; ".join(str(row[0]) for row in connection.execute("PRAGMA integrity_check"))
    finally:
        connection.close()


@dataclass(slots=True)
class Audit:
    """What one look at the data dir found that no object accounts for."""

    qemus: dict[str, list[int]]
    qemus_without_vm: list[dict[str, Any]] = field(default_factory=list)
    qemus_unmanaged: list[dict[str, Any]] = field(default_factory=list)
    port_rows_without_vm: list[dict[str, Any]] = field(default_factory=list)
    disk_rows_without_vm: list[dict[str, Any]] = field(default_factory=list)
    disk_files_without_vm: list[str] = field(default_factory=list)
    runtime_dirs_without_vm: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> dict[str, list[int]]:
        return {uid: pids for uid, pids in self.qemus.items() if len(pids) > 1 and uid != UNKNOWN_VM}

    @property
    def leaks(self) -> int:
        return (
            len(self.qemus_without_vm)
            + len(self.qemus_unmanaged)
            + len(self.port_rows_without_vm)
            + len(self.disk_rows_without_vm)
            + len(self.disk_files_without_vm)
            + len(self.runtime_dirs_without_vm)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "leaks": self.leaks,
            "qemus_without_vm": self.qemus_without_vm,
            "qemus_unmanaged": self.qemus_unmanaged,
            "port_rows_without_vm": self.port_rows_without_vm,
            "disk_rows_without_vm": self.disk_rows_without_vm,
            "disk_files_without_vm": self.disk_files_without_vm,
            "runtime_dirs_without_vm": self.runtime_dirs_without_vm,
            "duplicates": self.duplicates,
        }


def audit(data_dir: Path) -> Audit:
    """Look once. A QEMU is accounted for only when its VM's status names its pid: any other is
    without VM (no live object) or unmanaged (the controller does not know it runs)."""
    rows, ports, disks = read_store(data_dir / DB_FILE_NAME)
    objects = {uid for uid, _, _ in rows}
    status_pid = {
        uid: json.loads(status or "{}").get("pid") for uid, deleted_at, status in rows if not deleted_at
    }
    result = Audit(qemus=qemus_by_uid(data_dir))
    for uid, pids in sorted(result.qemus.items()):
        for pid in pids:
            if uid not in status_pid:
                result.qemus_without_vm.append({"uid": uid, "pid": pid})
            elif pid != status_pid[uid]:
                result.qemus_unmanaged.append({"uid": uid, "pid": pid, "status_pid": status_pid[uid]})
    result.port_rows_without_vm = [
        {"uid": uid, "protocol": protocol, "guest_port": guest, "host_port": host}
        for uid, protocol, guest, host in ports
        if uid not in objects
    ]
    result.disk_rows_without_vm = [
        {"uid": uid, "name": name, "path": path} for uid, name, path in disks if uid not in objects
    ]
    layout = server_layout(data_dir)
    for directory in uid_dirs(layout.disks_root, objects):
        # The files, or the dir itself when it is empty: either way something nobody removes.
        files = [str(path) for path in sorted(directory.rglob("*")) if path.is_file()]
        result.disk_files_without_vm += files or [str(directory)]
    result.runtime_dirs_without_vm = [str(directory) for directory in uid_dirs(layout.run_root, objects)]
    return result


def uid_dirs(root: Path, objects: set[str]) -> list[Path]:
    """Entries of ROOT/<uid> whose uid has no object."""
    if not root.is_dir():
        return []
    return [entry for entry in sorted(root.iterdir()) if entry.name not in objects]
