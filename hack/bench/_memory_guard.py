"""A memory guard for benchmarks that start many QEMUs: it watches the machine's free memory
and kills the run's QEMUs before the machine runs out (hack/bench/converge)."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from _common import BenchError
from _procfs import kill_qemus, qemu_processes, rss_bytes

MEMORY_GUARD_PERIOD_S = 0.2
GIB = 1024**3
MIB = 1024**2
# The machine has 24 GiB; the QEMUs of one run keep to half of it (--memory-cap).
DEFAULT_MEMORY_CAP_GIB = 12.0


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no MemAvailable")


class MemoryGuard:
    """Watches the machine's free memory while this run's QEMUs (those naming `root`) live.

    Below `floor` bytes available, or once they hold more than `cap` bytes of RSS together, it
    kills them and interrupts the main thread, which turns the interrupt into a BenchError
    (`watching`). `peak` is the most RSS they held at once.
    """

    def __init__(self, root: Path, *, floor: int, cap: int | None = None) -> None:
        self.root = root
        self.floor = floor
        self.cap = cap
        self.peak = 0
        self.tripped: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-guard", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(MEMORY_GUARD_PERIOD_S):
            held = sum(rss_bytes(pid) for pid in qemu_processes(self.root))
            self.peak = max(self.peak, held)
            available = mem_available()
            if self.tripped is not None:
                continue
            if available < self.floor:
                self.tripped = (
                    f"MemAvailable fell to {available / GIB:.1f} GiB (floor {self.floor / GIB:.1f} GiB)"
                    f" with this run's QEMUs at {self.peak / GIB:.1f} GiB RSS; they were killed"
                )
            elif self.cap is not None and held > self.cap:
                self.tripped = (
                    f"this run's QEMUs held {held / GIB:.1f} GiB RSS, over the {self.cap / GIB:.1f} GiB"
                    " cap; they were killed"
                )
            else:
                continue
            kill_qemus(self.root)
            _thread.interrupt_main()

    @contextlib.contextmanager
    def watching(self) -> Iterator[MemoryGuard]:
        self._thread.start()
        try:
            yield self
        except KeyboardInterrupt:
            if self.tripped is None:
                raise
            raise BenchError(f"memory guard: {self.tripped}") from None
        finally:
            self._stop.set()
            self._thread.join()


def memory_room(count: int, args: argparse.Namespace) -> str | None:
    """Why N = `count` does not fit in this machine's free memory now, or under the cap on
    the QEMUs' memory (None: it fits)."""
    qemus = count * args.rss_estimate * MIB
    if qemus > args.memory_cap * GIB:
        return (
            f"N={count} needs ~{qemus / GIB:.1f} GiB of QEMUs ({count} x {args.rss_estimate} MiB),"
            f" over the {args.memory_cap:g} GiB cap (--memory-cap)"
        )
    needed = qemus + int(args.memory_floor * GIB)
    available = mem_available()
    if available >= needed:
        return None
    return (
        f"N={count} needs ~{needed / GIB:.1f} GiB ({count} x {args.rss_estimate} MiB + the"
        f" {args.memory_floor:g} GiB floor) and {available / GIB:.1f} GiB is available"
    )
