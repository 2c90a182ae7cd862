"""The VMs' swtpm processes: started, proven ours, watched, adopted and ended like QEMU.

A swtpm is spawned exactly as QEMU is (process.spawn): under the per-VM supervisor, in a
session of its own, holding a lock, with a launch record in DATA/run/<uid>/tpm/ that proves it
ours by /proc start time and cmdline, so it outlives a controller restart and is adopted by the
next one. A pidfd on its supervisor wakes the VM when it exits; a QEMU that lost its TPM is then
restarted by the plan (controller/firmware.py).

It serves one QEMU and exits when that QEMU closes its socket (`--terminate`), so every start of
QEMU gets a fresh one: a guest's TPM never outlives its boot unless `persistent` keeps its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal as signals
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.clock import Clock
from controller.firmware import TpmFailed
from controller.model import TpmObservation
from controller.qemu import process
from controller.qemu.argv import RuntimePaths, argv_digest
from controller.qemu.firmware import TPM_SOCKET_NAME, TPM_STATE_DIR_NAME, swtpm_argv, tpm_paths
from controller.qemu.runtime import open_pidfd

log = structlog.get_logger(__name__)
# swtpm listens within milliseconds; this bounds a wedged or starved one.
LISTEN_SECONDS = 10.0
# SIGTERM makes swtpm save its state and exit at once; SIGKILL after this.
STOP_SECONDS = 5.0
_POLL_SECONDS = 0.02


@dataclass
class _Watch:
    record: process.LaunchRecord
    pidfd: int
    # The supervisor, when this controller started it (to reap it).
    child: subprocess.Popen[bytes] | None


class Swtpm:
    """Implements controller.firmware.TpmEmulators with the `swtpm` binary."""

    def __init__(self, *, clock: Clock, wake: Callable[[str], None]) -> None:
        """`wake(uid)` queues a reconcile of the VM whose swtpm exited."""
        self._clock = clock
        self._wake = wake
        self._watched: dict[str, _Watch] = {}

    async def inspect(self, uid: str, paths: RuntimePaths) -> TpmObservation | None:
        watch = self._watched.get(uid)
        record = watch.record if watch is not None else process.read_launch_record(tpm_paths(paths))
        if record is None or not process.is_alive_and_ours(record, identity_proven=watch is not None):
            return None
        return TpmObservation(record.pid, watched=watch is not None)

    async def start(self, uid: str, paths: RuntimePaths, *, persistent: bool) -> None:
        await self.stop(uid, paths)
        tpm = tpm_paths(paths)
        directory = Path(tpm.directory)
        state = directory / TPM_STATE_DIR_NAME
        try:
            if not persistent:
                await asyncio.to_thread(shutil.rmtree, state, True)
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                (directory / TPM_SOCKET_NAME).unlink()
        except OSError as err:
            raise TpmFailed(f"the TPM state dir {state}: {err.strerror}") from err
        argv = swtpm_argv()
        try:
            child = await asyncio.to_thread(
                process.spawn, argv, argv_digest(argv), tpm, now=self._clock.now()
            )
        except process.SpawnFailed as err:
            raise TpmFailed(f"swtpm cannot start: {err}") from err
        record = process.read_launch_record(tpm)
        assert record is not None, "spawn writes the launch record"
        self._watch(uid, record, child)
        log.info("tpm_spawned", uid=uid, pid=record.pid, persistent=persistent)
        await self._wait_listening(uid, paths, record)

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        record = process.read_launch_record(tpm_paths(paths))
        if record is None or record.pid != pid or uid in self._watched:
            return
        if process.is_alive_and_ours(record):
            self._watch(uid, record, None)
            log.info("tpm_adopted", uid=uid, pid=pid)

    async def stop(self, uid: str, paths: RuntimePaths) -> None:
        watch = self._watched.get(uid)
        record = watch.record if watch is not None else process.read_launch_record(tpm_paths(paths))
        if record is not None and _running(record):
            process.send_signal(record, signals.SIGTERM)
            if not await self._gone_within(record, STOP_SECONDS):
                process.send_signal(record, signals.SIGKILL)
                await self._gone_within(record, STOP_SECONDS)
            log.info("tpm_stopped", uid=uid, pid=record.pid)
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
        log.info("tpm_exit_detected", uid=uid, pid=watch.record.pid)
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

    async def _wait_listening(self, uid: str, paths: RuntimePaths, record: process.LaunchRecord) -> None:
        """Return once swtpm's socket exists. :raise TpmFailed: it exited, or took too long."""
        tpm = tpm_paths(paths)
        socket = Path(tpm.directory) / TPM_SOCKET_NAME
        deadline = self._clock.monotonic() + LISTEN_SECONDS
        while not socket.exists():
            if not process.is_alive_and_ours(record, identity_proven=True):
                self._forget(uid)
                raise TpmFailed(f"swtpm exited at start: {process.stderr_tail(tpm) or 'no message'}")
            if self._clock.monotonic() > deadline:
                await self.stop(uid, paths)
                raise TpmFailed(f"swtpm did not listen within {LISTEN_SECONDS:.0f} s")
            await asyncio.sleep(_POLL_SECONDS)

    async def _gone_within(self, record: process.LaunchRecord, seconds: float) -> bool:
        deadline = self._clock.monotonic() + seconds
        while _running(record):
            if self._clock.monotonic() > deadline:
                return False
            await asyncio.sleep(_POLL_SECONDS)
        return True


def _running(record: process.LaunchRecord) -> bool:
    """swtpm, or its supervisor, which holds the TPM dir's lock until it has recorded the exit: a
    new swtpm can start only once both are gone."""
    return process.is_alive_and_ours(record) or process.supervisor_alive(record)
