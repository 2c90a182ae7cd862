"""A VM's helper processes (swtpm, passt): started, proven ours, watched, adopted and ended like QEMU.

A helper is spawned exactly as QEMU is (process.spawn): under the per-VM supervisor, in a
session of its own, holding a lock, with a launch record in its own dir inside DATA/run/<uid>/
that proves it ours by /proc start time and cmdline, so it outlives a controller restart and is
adopted by the next one. A pidfd on its supervisor wakes the VM when it exits; the plan decides
what that means (a QEMU that lost its TPM or its network is restarted).

Every helper serves one QEMU on a UNIX socket and exits when that QEMU closes it, so every start
of QEMU gets a fresh one. swtpm.py and passt.py say what each one is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal as signals
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.clock import Clock
from controller.model import SidecarObservation
from controller.qemu import process
from controller.qemu.argv import RuntimePaths, argv_digest
from controller.qemu.runtime import open_pidfd

log = structlog.get_logger(__name__)
# Helpers listen within milliseconds; this bounds a wedged or starved one.
LISTEN_SECONDS = 10.0
# SIGTERM makes a helper exit at once (swtpm saves its state first); SIGKILL after this.
STOP_SECONDS = 5.0
_POLL_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class SidecarKind:
    """What differs between helpers: their name, their dir inside the VM's runtime dir and the
    error raised when one cannot start (its message says why; the caller retries later). Log
    events are named
    `<event>_spawned`, `<event>_adopted`, `<event>_stopped` and `<event>_exit_detected`."""

    name: str
    event: str
    paths: Callable[[RuntimePaths], RuntimePaths]
    error: type[Exception]


@dataclass
class _Watch:
    record: process.LaunchRecord
    pidfd: int
    # The supervisor, when this controller started it (to reap it).
    child: subprocess.Popen[bytes] | None


class Sidecars:
    """One kind of helper process, one per VM at most."""

    def __init__(self, kind: SidecarKind, *, clock: Clock, wake: Callable[[str], None]) -> None:
        """`wake(uid)` queues a reconcile of the VM whose helper exited."""
        self._kind = kind
        self._clock = clock
        self._wake = wake
        self._watched: dict[str, _Watch] = {}

    async def inspect(self, uid: str, paths: RuntimePaths) -> SidecarObservation | None:
        watch = self._watched.get(uid)
        record = watch.record if watch is not None else process.read_launch_record(self._kind.paths(paths))
        if record is None or not process.is_alive_and_ours(record, identity_proven=watch is not None):
            return None
        return SidecarObservation(record.pid, watched=watch is not None)

    async def launch(self, uid: str, paths: RuntimePaths, argv: tuple[str, ...], socket_name: str) -> None:
        """Start `argv` in the helper's dir (prepared by the caller, a leftover helper stopped)
        and return once `socket_name` exists in that dir. :raise kind.error: it cannot start or
        listen."""
        own = self._kind.paths(paths)
        try:
            child = await asyncio.to_thread(
                process.spawn, argv, argv_digest(argv), own, now=self._clock.now()
            )
        except process.SpawnFailed as err:
            raise self._kind.error(f"{self._kind.name} cannot start: {err}") from err
        record = process.read_launch_record(own)
        assert record is not None, "spawn writes the launch record"
        self._watch(uid, record, child)
        log.info(f"{self._kind.event}_spawned", uid=uid, pid=record.pid)
        await self._wait_listening(uid, paths, record, socket_name)

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        record = process.read_launch_record(self._kind.paths(paths))
        if record is None or record.pid != pid or uid in self._watched:
            return
        if process.is_alive_and_ours(record):
            self._watch(uid, record, None)
            log.info(f"{self._kind.event}_adopted", uid=uid, pid=pid)

    async def stop(self, uid: str, paths: RuntimePaths) -> None:
        watch = self._watched.get(uid)
        record = watch.record if watch is not None else process.read_launch_record(self._kind.paths(paths))
        if record is not None and _running(record):
            process.send_signal(record, signals.SIGTERM)
            if not await self._gone_within(record, STOP_SECONDS):
                process.send_signal(record, signals.SIGKILL)
                await self._gone_within(record, STOP_SECONDS)
            log.info(f"{self._kind.event}_stopped", uid=uid, pid=record.pid)
        self._forget(uid)

    async def close(self) -> None:
        """Stop watching (controller shutdown); the processes run on, to be adopted."""
        for uid in list(self._watched):
            self._forget(uid)

    def watched_uids(self) -> list[str]:
        return list(self._watched)

    def _watch(self, uid: str, record: process.LaunchRecord, child: subprocess.Popen[bytes] | None) -> None:
        self._forget(uid)
        opened = open_pidfd(record)
        if opened is None:
            if child is not None:
                child.poll()
            return
        pidfd, _ = opened
        self._watched[uid] = _Watch(record, pidfd, child)
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, uid)

    def _on_exit(self, uid: str) -> None:
        watch = self._watched.get(uid)
        if watch is None:
            return
        self._forget(uid)
        log.info(f"{self._kind.event}_exit_detected", uid=uid, pid=watch.record.pid)
        self._wake(uid)

    def _forget(self, uid: str) -> None:
        watch = self._watched.pop(uid, None)
        if watch is None:
            return
        asyncio.get_running_loop().remove_reader(watch.pidfd)
        with contextlib.suppress(OSError):
            os.close(watch.pidfd)
        if watch.child is not None:
            watch.child.poll()  # reap the supervisor, if it is done

    async def _wait_listening(
        self, uid: str, paths: RuntimePaths, record: process.LaunchRecord, socket_name: str
    ) -> None:
        """Return once the helper's socket exists. :raise kind.error: it exited, or took too long."""
        own = self._kind.paths(paths)
        socket = Path(own.directory) / socket_name
        deadline = self._clock.monotonic() + LISTEN_SECONDS
        while not socket.exists():
            if not process.is_alive_and_ours(record, identity_proven=True):
                self._forget(uid)
                why = process.stderr_tail(own) or "no message"
                raise self._kind.error(f"{self._kind.name} exited at start: {why}")
            if self._clock.monotonic() > deadline:
                await self.stop(uid, paths)
                raise self._kind.error(f"{self._kind.name} did not listen within {LISTEN_SECONDS:.0f} s")
            await asyncio.sleep(_POLL_SECONDS)

    async def _gone_within(self, record: process.LaunchRecord, seconds: float) -> bool:
        deadline = self._clock.monotonic() + seconds
        while _running(record):
            if self._clock.monotonic() > deadline:
                return False
            await asyncio.sleep(_POLL_SECONDS)
        return True


def _running(record: process.LaunchRecord) -> bool:
    """The helper, or its supervisor, which holds the helper dir's lock until it has recorded the
    exit: a new helper can start only once both are gone."""
    return process.is_alive_and_ours(record) or process.supervisor_alive(record)


class SidecarProgram:
    """What every supervised helper program (swtpm, passt) does alike: look at, adopt, stop and
    let go of its processes. A subclass adds how one starts."""

    def __init__(self, kind: SidecarKind, *, clock: Clock, wake: Callable[[str], None]) -> None:
        """`wake(uid)` queues a reconcile of the VM whose process exited."""
        self._processes = Sidecars(kind, clock=clock, wake=wake)

    async def inspect(self, uid: str, paths: RuntimePaths) -> SidecarObservation | None:
        return await self._processes.inspect(uid, paths)

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        await self._processes.attach(uid, paths, pid)

    async def stop(self, uid: str, paths: RuntimePaths) -> None:
        await self._processes.stop(uid, paths)

    async def close(self) -> None:
        """Stop watching (controller shutdown); the processes run on, to be adopted."""
        await self._processes.close()

    def watched_uids(self) -> list[str]:
        return self._processes.watched_uids()
