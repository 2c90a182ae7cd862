"""Liveness decisions: which watched QEMUs need their QMP asked, from one cheap look at /proc.

A healthy QEMU needs no look at all: its exit comes through the pidfd within milliseconds and
its run-state changes come as QMP events (controller/qemu/runtime.py). What neither reports is
a QEMU that hangs: stopped (SIGSTOP), or alive with a main loop that no longer serves QMP.

QEMU serves QMP commands from its main loop, which waits in poll() whenever it has nothing to
do. So the main thread's kernel wait channel (/proc/PID/wchan, one small read, no round trip to
QEMU) tells a healthy idle QEMU (sleeping in poll) from one that is stopped (`do_signal_stop`),
blocked elsewhere (a futex, uninterruptible I/O) or running. A busy main loop, or one waiting
for a CPU on a loaded host, is seen running often, so an odd look is followed by closer ones:
the main thread's voluntary context switches (/proc/PID/status) are read, and looked at again a
few times 100 ms apart. One back in poll is healthy, and so is one running that went to sleep
meanwhile (the count moved): busy, not spinning. One stopped or blocked stays odd.
Only a QEMU that stays odd, or whose QMP connection or socket is gone, is asked: its known
run-state is forgotten and its VM woken, the reconcile asks `query-status`, and one that does
not answer within the QMP timeout is killed and restarted as before (controller/plan.py).

A kernel that hides wait channels makes every look odd: each period then asks every QEMU, as
the controller did before this look existed. Pure: the reads are in liveness_watch.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

# The kernel functions a thread sleeps in while blocked in poll(), ppoll(), select() or
# epoll_wait(): where an idle QEMU main loop waits for its next fd or timer.
POLL_WAITS = (
    "poll_schedule_timeout",
    "do_sys_poll",
    "do_select",
    "core_sys_select",
    "ep_poll",
    "do_epoll_wait",
)
# The wait channel of a thread that is running or waiting for a CPU.
RUNNING = "0"
# An odd look is repeated this many times, RELOOK_SECONDS apart, before the QEMU is asked: a
# healthy main loop that was busy, or waiting for a CPU, at the first look sleeps in poll again
# within milliseconds once it runs, even on a saturated host with QEMU at a low priority.
RELOOKS = 3
RELOOK_SECONDS = 0.1
# Each pass starts up to this share of the period early, so passes do not fall into step with
# the resync; never late, which would stretch the detection bound.
JITTER = 0.2


@dataclass(frozen=True, slots=True)
class Target:
    """A watched QEMU as the liveness pass sees it."""

    uid: str
    pid: int
    # Whether its QMP connection is up (it reads the events that replace the periodic ask).
    monitor_connected: bool
    qmp_socket: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at a QEMU's main thread. `wchan` None: the process is gone (its pidfd tells)."""

    wchan: str | None
    socket_present: bool = True
    # The main thread's voluntary context switches (read only in the closer looks).
    voluntary_switches: int | None = None


class Look(StrEnum):
    HEALTHY = "healthy"
    # The process is gone: the pidfd reports the exit, nothing to ask.
    GONE = "gone"
    # Not waiting in poll (stopped, blocked elsewhere, or busy): looked at again, then asked.
    ODD = "odd"
    # No QMP connection: no events come, so its state is only known by asking (and reconnecting).
    NO_MONITOR = "no-monitor"
    # Its QMP socket was removed: the reconcile kills it (controller/plan.py).
    NO_SOCKET = "no-socket"


# The looks whose VM is woken with its run-state forgotten, so that its reconcile asks QMP.
ASK = frozenset({Look.ODD, Look.NO_MONITOR, Look.NO_SOCKET})


def sleeping_in_poll(wchan: str) -> bool:
    """Whether a wait channel is one of poll's (a symbol may carry a `.constprop.0` suffix)."""
    return wchan.split(".", 1)[0] in POLL_WAITS


def judge(target: Target, sample: Sample, since: Sample | None = None) -> Look:
    """What one look says; `since`: the first closer look, whose switch count this one's is
    compared with (a main loop that slept since then is not hung)."""
    if sample.wchan is None:
        return Look.GONE
    if not sample.socket_present:
        return Look.NO_SOCKET
    if not target.monitor_connected:
        return Look.NO_MONITOR
    if sleeping_in_poll(sample.wchan) or _busy(sample, since):
        return Look.HEALTHY
    return Look.ODD


def _busy(sample: Sample, since: Sample | None) -> bool:
    """Running now, and asleep at least once since `since`: a busy main loop, not a spinning
    one. One asleep elsewhere now (stopped, blocked) may have just hung: it stays odd."""
    if sample.wchan != RUNNING or since is None:
        return False
    if since.voluntary_switches is None or sample.voluntary_switches is None:
        return False
    return sample.voluntary_switches > since.voluntary_switches


def relook(looks: Mapping[str, Look]) -> list[str]:
    """The uids to look at again: those that looked odd."""
    return [uid for uid, look in looks.items() if look is Look.ODD]


def to_ask(looks: Mapping[str, Look]) -> list[str]:
    """The uids whose QMP must be asked once the re-looks are done."""
    return sorted(uid for uid, look in looks.items() if look in ASK)


def next_delay(period: float, draw: float) -> float:
    """Seconds to the next pass: `period`, up to JITTER of it early (`draw` is in [0, 1))."""
    return period * (1.0 - JITTER * min(max(draw, 0.0), 1.0))
