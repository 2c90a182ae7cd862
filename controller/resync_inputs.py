"""The reads behind an incremental resync (controller/resync.py decides from them).

Per key: two dict lookups, three stats (runtime dir, launch and exit records), one per disk,
and one /proc/PID/stat read for a watched process. No store read beyond the inventory the
resync takes anyway (sources.take_inventory), no QMP.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from pathlib import PurePath

import structlog

from api.infra.metrics import Metrics
from controller.clock import Clock
from controller.layout import DataLayout
from controller.qemu import process
from controller.resync import Fingerprint, ResyncSelector
from controller.sources import Inventory

log = structlog.get_logger(__name__)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _mtime(path: str) -> int | None:
    found = _stat(path)
    return found.st_mtime_ns if found is not None else None


def _process(record: process.LaunchRecord | None) -> tuple[int, int, bool] | None:
    if record is None:
        return None
    fields = process.stat_fields(record.pid)
    alive = fields is not None and fields[0] not in (b"Z", b"X") and int(fields[19]) == record.start_ticks
    return record.pid, record.start_ticks, alive


def fingerprints(
    inventory: Inventory,
    layout: DataLayout,
    watched: Callable[[str], process.LaunchRecord | None],
) -> dict[str, Fingerprint]:
    """Every key's fingerprint. `watched(uid)`: the launch record of the process watched for it."""
    ledger: dict[str, list[Hashable]] = {}
    for port in inventory.ports:
        ledger.setdefault(port.uid, []).append(port)
    for disk in inventory.disks:
        ledger.setdefault(disk.uid, []).append((disk, os.path.exists(disk.path)))
    # Plain strings: building each VM's RuntimePaths would cost more than its stats.
    run_root = str(layout.run_root)
    template = layout.runtime("_")
    record_name, exit_name = PurePath(template.record).name, PurePath(template.exit_record).name
    found: dict[str, Fingerprint] = {}
    for uid in inventory.uids():
        path = f"{run_root}/{uid}"
        directory = _stat(path)
        records = (
            (_mtime(f"{path}/{record_name}"), _mtime(f"{path}/{exit_name}"))
            if directory is not None
            else (None, None)
        )
        found[uid] = Fingerprint(
            version=inventory.versions.get(uid),
            ledger=tuple(ledger.get(uid, ())),
            runtime_dir=(directory.st_ino, directory.st_mtime_ns) if directory is not None else None,
            records=records,
            process=_process(watched(uid)),
        )
    return found


class IncrementalResync:
    """The resync's `choose` (sources.resync_forever): the keys whose inputs changed, and every
    key once per `full_every` seconds; `metrics` counts the keys each pass queued and skipped."""

    def __init__(
        self,
        *,
        layout: DataLayout,
        watched: Callable[[str], process.LaunchRecord | None],
        full_every: float,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._layout = layout
        self._watched = watched
        self._clock = clock
        self._metrics = metrics
        self._selector = ResyncSelector(full_every=full_every)

    def __call__(self, inventory: Inventory) -> tuple[str, ...]:
        current = fingerprints(inventory, self._layout, self._watched)
        choice = self._selector.choose(current, self._clock.monotonic())
        if self._metrics is not None:
            self._metrics.resync_keys_total.labels(outcome="queued").inc(len(choice.keys))
            self._metrics.resync_keys_total.labels(outcome="skipped").inc(choice.skipped)
        log.debug("resync_chosen", queued=len(choice.keys), skipped=choice.skipped, full=choice.full)
        return choice.keys
