"""Incremental resync: which keys a resync pass queues. Pure; the reads are in resync_inputs.py.

The resync exists for what no event reports (a runtime dir removed by hand, a process killed
while its pidfd was not watched, a write the store watch missed). Reconciling a VM whose inputs
are exactly as the previous pass found them cannot find any of that, so a pass queues only the
keys whose fingerprint changed since the previous pass (or that are new), and every key once
per `full_every` seconds (the safety net for an input the fingerprint does not cover, e.g. a
base image replaced in place, and for a VM whose last reconcile failed for good). A VM waiting
for something (an image, a quota, a retry) needs no resync: its plan asks to be looked at again.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a reconcile of one key reads, as cheaply as it can be read."""

    # The object's resourceVersion: its spec, generation, deletion, run override and status.
    version: int | None
    # The ledger rows it holds (ports, disks), each disk with whether its file exists.
    ledger: tuple[Hashable, ...]
    # The runtime dir's (inode, mtime): a file created, renamed or removed in it changes it.
    runtime_dir: tuple[int, int] | None
    # The launch and exit records' mtimes (ns), None when absent.
    records: tuple[int | None, int | None]
    # The watched process: (pid, start ticks, alive per /proc), None when none is watched.
    process: tuple[int, int, bool] | None


@dataclass(frozen=True, slots=True)
class Choice:
    keys: tuple[str, ...]
    full: bool
    skipped: int


class ResyncSelector:
    """Remembers the previous pass's fingerprints; chooses each pass's keys."""

    def __init__(self, *, full_every: float) -> None:
        self._full_every = full_every
        self._seen: dict[str, Fingerprint] = {}
        self._full_at: float | None = None

    def choose(self, current: Mapping[str, Fingerprint], now: float) -> Choice:
        """The keys to queue at `now` (a monotonic time): all of them on the first pass and
        once `full_every` has passed since the last full one; else those that changed."""
        full = self._full_at is None or now - self._full_at >= self._full_every
        if full:
            self._full_at = now
            keys = tuple(sorted(current))
        else:
            keys = tuple(sorted(uid for uid, seen in current.items() if self._seen.get(uid) != seen))
        self._seen = dict(current)
        return Choice(keys, full, len(current) - len(keys))
