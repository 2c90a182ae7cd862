"""/proc readings of the benchmarks: CPU seconds, on-CPU nanoseconds (schedstat), RSS, machine
busy time, the QEMUs of a workspace, and how loaded the machine is.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import CLK_TCK, KILL_WAIT_S, progress

from controller.qemu.process import is_running_process


def read_proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after "(comm)": [0] is the state, [11] utime, [12] stime."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; NaN once it is gone."""
    fields = read_proc_stat(pid)
    if fields is None:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def oncpu_ns(pid: int) -> int:
    """Nanoseconds all threads of `pid` have spent on a CPU (schedstat, exact, unlike the
    10 ms ticks of /proc/PID/stat). Threads that already exited are missed; the server's
    are long-lived (the event loop, aiosqlite's connection thread, the default executor)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent in user, nice and system mode since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return sum(int(value) for value in fields[1:4]) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def qemu_processes(root: Path) -> dict[int, float]:
    """Live QEMU processes whose command line names `root`, with their CPU seconds."""
    found: dict[int, float] = {}
    needle = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        argv = raw.split(b"\0")
        if not argv or not os.path.basename(argv[0]).startswith(b"qemu-system") or needle not in raw:
            continue
        pid = int(entry)
        if is_running_process(pid):
            found[pid] = cpu_seconds(pid)
    return found


def kill_qemus(root: Path) -> int:
    """SIGKILL every QEMU naming `root` and wait until none runs. Returns how many were killed."""
    victims = list(qemu_processes(root))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while any(is_running_process(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(victims)


@dataclass
class LoadMeter:
    """Machine load that is not ours during a measurement (other benchmarks, builds...).

    Ours is this script, the server and every QEMU under the workspace. CPU of processes that
    exited between samples is lost (counted as foreign): call `sample()` before killing one.
    """

    root: Path
    server_pid: int | None
    started: float = field(default_factory=time.monotonic)
    machine: float = field(default_factory=machine_busy_seconds)
    own_self: float = field(default_factory=self_cpu_seconds)
    server: float = 0.0
    qemu_first: dict[int, float] = field(default_factory=dict)
    qemu_last: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        self.qemu_first = qemu_processes(self.root)
        self.qemu_last = dict(self.qemu_first)

    def sample(self) -> None:
        for pid, seconds in qemu_processes(self.root).items():
            self.qemu_last[pid] = seconds

    def foreign_cores(self) -> float:
        """Average cores used by other processes since the meter started."""
        self.sample()
        wall = time.monotonic() - self.started
        server = (cpu_seconds(self.server_pid) - self.server) if self.server_pid else 0.0
        qemus = sum(seconds - self.qemu_first.get(pid, 0.0) for pid, seconds in self.qemu_last.items())
        own = (self_cpu_seconds() - self.own_self) + (0.0 if math.isnan(server) else server) + qemus
        return max(0.0, (machine_busy_seconds() - self.machine - own) / wall) if wall > 0 else 0.0


def wait_quiet(root: Path, server_pid: int | None, *, max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most `max_wait` s) for a 1 s window in which other processes use less than
    `threshold` cores; other benchmarks and test suites may share the machine. Returns the
    foreign load of the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = LoadMeter(root, server_pid)
        time.sleep(1.0)
        foreign = meter.foreign_cores()
        if foreign < threshold or time.monotonic() >= deadline:
            if foreign >= threshold:
                progress(f"the machine stayed busy ({foreign:.2f} foreign cores); measuring anyway")
            return foreign
