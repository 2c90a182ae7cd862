"""What the run records: faults, controller kills, QEMU lifetimes, and the duplicates they reveal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chaoslib.basics import UNKNOWN_VM, iso, rounded
from controller.exits import crash_backoff


@dataclass(slots=True)
class Fault:
    kind: str
    vm: str
    uid: str
    pid: int
    at: float  # epoch seconds, just before the fault
    # The controller was down (killed, or restarted but not running its workers yet) at some
    # moment between the fault and its recovery: its MTTR includes that outage.
    controller_outage: bool
    recovered_at: float | None = None
    new_pid: int | None = None
    timing: str = ""  # "log" (controller's status_written) or "poll" (the API was seen)
    # The VM's consecutive failures once recovered (its status): the crash-loop backoff in MTTR.
    failures: int = 0
    settled: bool = False

    @property
    def backoff_s(self) -> float:
        return crash_backoff(self.failures).total_seconds()

    @property
    def mttr_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.at

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vm": self.vm,
            "uid": self.uid,
            "pid": self.pid,
            "at": iso(self.at),
            "controller_outage": self.controller_outage,
            "recovered": self.recovered_at is not None,
            "mttr_s": rounded(self.mttr_s),
            "new_pid": self.new_pid,
            "timing": self.timing or None,
            "failures": self.failures,
            "backoff_s": self.backoff_s,
        }


@dataclass(slots=True)
class ControllerKill:
    pid: int
    at: float
    restarted_at: float | None = None
    new_pid: int | None = None
    started_logged_at: float | None = None  # its `controller_started` log line

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "at": iso(self.at),
            "restarted_after_s": rounded(None if self.restarted_at is None else self.restarted_at - self.at),
            "new_pid": self.new_pid,
            "down_s": rounded(None if self.started_logged_at is None else self.started_logged_at - self.at),
        }


@dataclass(slots=True)
class Lifetime:
    """When one QEMU is known to have lived: /proc scans (alive, not a zombie) and the
    controller's log (`vm_spawned` is logged after the fork, `vm_exit_detected` just after the
    exit), so [start, end] covers the seen part of its life."""

    seen_first: float | None = None
    seen_last: float | None = None
    spawned: float | None = None
    exited: float | None = None

    def see(self, at: float) -> None:
        self.seen_first = at if self.seen_first is None else self.seen_first
        self.seen_last = at

    @property
    def start(self) -> float | None:
        known = [at for at in (self.spawned, self.seen_first) if at is not None]
        return min(known) if known else None

    @property
    def end(self) -> float | None:
        return self.exited if self.exited is not None else self.seen_last


def overlapping(lifetimes: Mapping[str, Mapping[int, Lifetime]]) -> list[dict[str, Any]]:
    """Pairs of QEMUs of one VM whose lives overlapped: duplicates, however short (a second
    QEMU that dies at start on a disk or port lock still ran beside the first)."""
    found = []
    for uid, pids in sorted(lifetimes.items()):
        if uid == UNKNOWN_VM:
            # QEMUs whose VM could not be told (caught mid-exec, runtime dir already gone) are
            # not one VM's; leaks of them are counted by the audit instead.
            continue
        spans = sorted(
            (life.start, life.end, pid)
            for pid, life in pids.items()
            if life.start is not None and life.end is not None
        )
        for index, (start, end, pid) in enumerate(spans):
            for other_start, other_end, other in spans[index + 1 :]:
                overlap = min(end, other_end) - max(start, other_start)
                if overlap >= 0:
                    found.append({"uid": uid, "pids": [pid, other], "overlap_s": rounded(overlap)})
    return found
