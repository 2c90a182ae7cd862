"""The liveness pass: every period, one batched look at /proc for every watched QEMU.

The decisions are controller/liveness.py's; this module reads (one /proc/PID/wchan read and one
stat of the QMP socket per QEMU, no QMP round trip; /proc/PID/status too for one that looked
odd) and wakes the few VMs that must be asked.
A hung QEMU is found within one period, the re-looks (RELOOKS x RELOOK_SECONDS) and the QMP
timeout of the ask (docs/controller.md, "Liveness").
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from controller.liveness import (
    RELOOK_SECONDS,
    RELOOKS,
    Look,
    Sample,
    Target,
    judge,
    next_delay,
    relook,
    to_ask,
)

log = structlog.get_logger(__name__)
_WCHAN_BYTES = 128
_STATUS_BYTES = 8192


class Watched(Protocol):
    """The runtime, as the liveness pass sees it (controller/qemu/runtime.py)."""

    def liveness_targets(self) -> list[Target]: ...

    def distrust(self, uid: str) -> None:
        """Forget `uid`'s known run-state, so its next look asks QMP."""


def read_wchan(pid: int) -> str | None:
    """The kernel function `pid`'s main thread sleeps in ("0" when running), None if it is gone."""
    try:
        descriptor = os.open(f"/proc/{pid}/wchan", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return "0"  # hidden: counts as odd, so the QEMU is asked
    try:
        return os.read(descriptor, _WCHAN_BYTES).decode(errors="replace").strip()
    except ProcessLookupError:
        return None
    finally:
        os.close(descriptor)


def read_voluntary_switches(pid: int) -> int | None:
    """The main thread's voluntary context switches (each sleep is one), None if unreadable."""
    try:
        descriptor = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(descriptor, _STATUS_BYTES)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    _, found, rest = text.partition(b"\nvoluntary_ctxt_switches:")
    return int(rest.split(maxsplit=1)[0]) if found and rest.strip() else None


def sample(target: Target) -> Sample:
    """The cheap look every pass takes of every QEMU."""
    return Sample(wchan=read_wchan(target.pid), socket_present=os.path.exists(target.qmp_socket))


def closer_sample(target: Target) -> Sample:
    """The look at a QEMU that looked odd: also its main thread's voluntary switches."""
    switches = read_voluntary_switches(target.pid)
    return Sample(
        wchan=read_wchan(target.pid),
        socket_present=os.path.exists(target.qmp_socket),
        voluntary_switches=switches,
    )


async def liveness_pass(
    runtime: Watched,
    *,
    wake: Callable[[str], None],
    look: Callable[[Target], Sample] = sample,
    look_closer: Callable[[Target], Sample] = closer_sample,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> list[str]:
    """Look at every watched QEMU; wake (with its state forgotten) each one that must be asked.
    Returns the uids woken."""
    targets = {target.uid: target for target in runtime.liveness_targets()}
    looks = {uid: judge(target, look(target)) for uid, target in targets.items()}
    first = {uid: look_closer(targets[uid]) for uid in relook(looks)}
    looks.update({uid: judge(targets[uid], closer) for uid, closer in first.items()})
    for _ in range(RELOOKS):
        odd = relook(looks)
        if not odd:
            break
        await sleep(RELOOK_SECONDS)
        looks.update({uid: judge(targets[uid], look_closer(targets[uid]), first[uid]) for uid in odd})
    asked = to_ask(looks)
    for uid in asked:
        runtime.distrust(uid)
        wake(uid)
    if asked:
        log.info("liveness_ask", count=len(asked), uids=asked[:20], looks=_counts(looks))
    return asked


async def watch_liveness(
    runtime: Watched,
    *,
    period: float,
    wake: Callable[[str], None],
    asked: Callable[[int], None] = lambda _count: None,
    look: Callable[[Target], Sample] = sample,
    look_closer: Callable[[Target], Sample] = closer_sample,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    draw: Callable[[], float] = random.random,
) -> None:
    """One liveness pass every `period` seconds (jittered early), until cancelled.
    `asked(n)` counts the QEMUs each pass has to ask (the rest cost no round trip)."""
    while True:
        await sleep(next_delay(period, draw()))
        woken = await liveness_pass(runtime, wake=wake, look=look, look_closer=look_closer, sleep=sleep)
        asked(len(woken))


def _counts(looks: dict[str, Look]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in looks.values():
        counts[value.value] = counts.get(value.value, 0) + 1
    return counts
