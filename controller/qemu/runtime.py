"""The QEMU implementation of the Hypervisor Protocol (controller/hypervisor.py): the live QEMU
processes this controller watches, exit via pidfd, events and commands via QMP.

Every process of ours, spawned or adopted, gets one attachment: a pidfd reader that notices the
exit within milliseconds (also for processes this controller is not the parent of), and one QMP
connection used for commands and for events. On exit the attachment writes the exit record to
the runtime dir (the controller may restart before reconciling it) and wakes the reconciler.

The pidfd follows QEMU's supervisor when it has one: the supervisor exits right after it has
written QEMU's wait status, so the exit record is written from that status. A QEMU without a
supervisor (started before supervisors, or whose supervisor was killed) is followed itself,
and its exit code is then unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal as signals
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import structlog

from controller.clock import Clock
from controller.hypervisor import AlreadyRunning, CommandRefused, CommandUnanswered, ProcessView, Spawned
from controller.liveness import Target
from controller.model import ProcessObservation, QmpState
from controller.qemu import process
from controller.qemu.argv import QMP_SOCKET_NAME, RuntimePaths
from controller.qemu.monitor import COMMAND_TIMEOUT_SECONDS, Monitor, MonitorCommandFailed, MonitorUnavailable
from controller.qemu.priority import lower_priority
from controller.resources.seed import write_seed
from controller.telemetry import TRACER

log = structlog.get_logger(__name__)
QMP_CONNECT_SECONDS = 10.0
# A QEMU that has run for a while (adopted, or reconnecting) listens already: a slow greeting
# means it hangs, and the liveness check should find that in seconds, not in two full waits.
QMP_RECONNECT_SECONDS = 2.0
# A run state learnt from a reply or an event is trusted this long before QMP is asked again
# (by a reconcile; the liveness pass makes it forget sooner a QEMU that looks hung in /proc).
STATE_TRUST_SECONDS = 5.0
_QMP_STATES = {state.value: state for state in QmpState} | {
    # QEMU paused the guest itself (werror=stop, a watchdog's pause action): a pause from
    # outside the controller's requests, which `cont` ends (controller/pausing.py).
    "io-error": QmpState.PAUSED,
    "watchdog": QmpState.PAUSED,
    "internal-error": QmpState.PAUSED,
}
# What these events and commands say about the run state, without asking query-status.
_EVENT_STATES = {
    "RESUME": QmpState.RUNNING,
    "STOP": QmpState.PAUSED,
    "SHUTDOWN": QmpState.SHUTDOWN,
    "GUEST_PANICKED": QmpState.PANICKED,
}
_COMMAND_STATES = {"cont": QmpState.RUNNING, "stop": QmpState.PAUSED}


@dataclass
class _Attachment:
    uid: str
    paths: RuntimePaths
    record: process.LaunchRecord
    child: subprocess.Popen[bytes] | None
    pidfd: int
    # The process the pidfd follows: QEMU's supervisor, or QEMU itself when it has none.
    watched_pid: int
    monitor: Monitor | None = None
    events: asyncio.Task[None] | None = field(default=None, repr=False)
    known_state: QmpState | None = None
    known_at: float = 0.0
    # Spawned by us and never connected yet: QEMU may still be starting up.
    fresh: bool = False
    # When QEMU announced its shutdown (QMP SHUTDOWN's timestamp, epoch seconds).
    shutdown_at: float | None = None
    # The guest brought up its network card (see ProcessObservation.guest_booted).
    guest_booted: bool = False


class Runtime:
    def __init__(
        self,
        *,
        clock: Clock,
        wake: Callable[[str], None],
        tasks: asyncio.TaskGroup,
        guest_nice: int = 0,
        exit_detected: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        """`wake(uid)` queues a reconcile; `tasks` owns the per-VM event readers.

        `guest_nice`: the CPU priority every watched QEMU gets (see priority.py).
        `exit_detected(seconds)`: how long after QEMU announced its shutdown the exit was noticed
        (only exits QEMU announces have a start time; a SIGKILL has none).
        """
        self._exit_detected = exit_detected
        self._clock = clock
        self._guest_nice = guest_nice
        self._wake = wake
        self._tasks = tasks
        self._attached: dict[str, _Attachment] = {}
        # Set whenever no process is watched: what a stop-everything shutdown waits for.
        self._none_attached = asyncio.Event()
        self._none_attached.set()

    def attached_record(self, uid: str) -> process.LaunchRecord | None:
        """The launch record of the process watched for `uid`, proven ours when attached.

        Its pidfd pins that process: the PID cannot be reused before the exit is noticed.
        """
        attachment = self._attached.get(uid)
        return attachment.record if attachment is not None else None

    def attached_uids(self) -> list[str]:
        """The VMs whose process is watched (alive, as far as its pidfd knows)."""
        return list(self._attached)

    def liveness_targets(self) -> list[Target]:
        """Every watched QEMU, for the liveness pass (controller/liveness_watch.py)."""
        return [
            Target(
                uid,
                attachment.record.pid,
                attachment.monitor is not None and attachment.monitor.is_connected,
                f"{attachment.paths.directory}/{QMP_SOCKET_NAME}",  # no Path built per VM and pass
            )
            for uid, attachment in self._attached.items()
        ]

    def distrust(self, uid: str) -> None:
        """Forget `uid`'s known run-state: its next look asks QMP (and finds a hung QEMU)."""
        attachment = self._attached.get(uid)
        if attachment is not None:
            attachment.known_state = None

    async def wait_none_attached(self) -> None:
        """Return once no process is watched (every exit seen, or every VM let go)."""
        await self._none_attached.wait()

    def _forget(self, uid: str) -> _Attachment | None:
        attachment = self._attached.pop(uid, None)
        if not self._attached:
            self._none_attached.set()
        return attachment

    def is_attached(self, uid: str, pid: int) -> bool:
        attachment = self._attached.get(uid)
        return attachment is not None and attachment.record.pid == pid

    async def _watch(
        self,
        uid: str,
        paths: RuntimePaths,
        record: process.LaunchRecord,
        *,
        child: subprocess.Popen[bytes] | None = None,
    ) -> None:
        """Watch `record.pid` (ours: spawned or adopted). Idempotent for the same pid."""
        if self.is_attached(uid, record.pid):
            return
        await self.detach(uid)
        opened = open_pidfd(record)
        if opened is None:
            self._record_exit(uid, paths, record, child)
            return
        pidfd, watched = opened
        attachment = _Attachment(uid, paths, record, child, pidfd, watched, fresh=child is not None)
        self._attached[uid] = attachment
        self._none_attached.clear()
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, uid)
        # Before QMP answers, so threads QEMU starts meanwhile inherit it; and after, for those
        # it started before (its vCPU threads exist once the monitor listens).
        lower_priority(record.pid, self._guest_nice)
        await self._connect_monitor(attachment)
        lower_priority(record.pid, self._guest_nice)
        if child is not None and attachment.monitor is not None:
            # We started it with -S: it is paused until we `cont`, no need to ask.
            self._learn(attachment, QmpState.PRELAUNCH)
        if child is None:
            attachment.guest_booted = await _nic_configured(attachment.monitor)

    async def detach(self, uid: str) -> None:
        """Stop watching `uid` without touching its process (controller shutdown)."""
        attachment = self._forget(uid)
        if attachment is not None:
            await self._release(attachment)

    async def close(self) -> None:
        for uid in list(self._attached):
            await self.detach(uid)

    def guest_booted(self, uid: str) -> bool:
        """Whether `uid`'s guest has brought up its network card (True if not watched)."""
        attachment = self._attached.get(uid)
        return attachment is None or attachment.guest_booted

    async def inspect(self, uid: str, paths: RuntimePaths, *, expect_process: bool) -> ProcessView:
        # A process the runtime watches was proven ours when it was attached; the files on disk
        # are read (and proven against /proc) only for one it does not watch yet.
        watched = self.attached_record(uid)
        record = watched if watched is not None else process.read_launch_record(paths)
        found: ProcessObservation | None = None
        if record is not None and _alive(record, paths, watched=watched is not None):
            found = ProcessObservation(
                pid=record.pid,
                argv_digest=record.digest,
                started_at=record.started_at,
                qmp=await self.qmp_state(uid) if watched is not None else QmpState.UNREACHABLE,
                runtime_intact=Path(paths.qmp_socket).exists(),
                guest_booted=self.guest_booted(uid),
                watched=watched is not None,
            )
        # QEMU's leader shows as a zombie for a few ms while its other threads exit; the pidfd
        # fires only when all are gone and then records the exit. Until then it is "exiting".
        exiting = found is None and record is not None and self.is_attached(uid, record.pid)
        exit_record = process.read_exit_record(paths)
        if found is None and record is not None and exit_record is None and process.supervisor_alive(record):
            # Nobody watches it, but its supervisor is about to record its wait status: wait
            # for that, or its exit would be recorded without one.
            exiting = True
        gone = found is None and not exiting
        return ProcessView(
            process=found,
            exit=exit_record,
            has_runtime_dir=Path(paths.directory).is_dir(),
            has_stale_runtime=gone and process.has_stale_files(paths),
            exiting=exiting,
            unrecorded_exit_pid=record.pid if gone and record is not None and exit_record is None else None,
            lost_pid=process.find_lost(paths) if expect_process and record is None else None,
        )

    async def spawn(
        self, uid: str, paths: RuntimePaths, argv: tuple[str, ...], digest: str
    ) -> Spawned | None:
        now = self._clock.now()
        try:
            # fork+exec of QEMU takes milliseconds; other VMs' reconciles go on meanwhile.
            child = await asyncio.to_thread(process.spawn, argv, digest, paths, now=now)
        except process.DuplicateProcess as err:
            raise AlreadyRunning(str(err)) from err
        except process.SpawnFailed as err:
            # A QEMU that cannot start leaves an exit record with its stderr; the next plan
            # counts it as a failure and backs off, the same path as any crash.
            Path(paths.stderr_log).write_text(str(err))
            process.write_exit_record(paths, exit_code=127, signal=None, started_at=now, now=now)
            return None
        record = process.read_launch_record(paths)
        assert record is not None, "spawn writes the launch record"
        # QEMU's pid; `child` is its supervisor.
        log.info("vm_spawned", uid=uid, pid=record.pid, argv_digest=digest)
        await self._watch(uid, paths, record, child=child)
        attachment = self._attached.get(uid)
        return Spawned(record.pid, monitor_ready=attachment is not None and attachment.monitor is not None)

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        record = self.attached_record(uid) or process.read_launch_record(paths)
        if record is None or record.pid != pid:
            return
        if process.is_alive_and_ours(record):
            await self._watch(uid, paths, record)
        else:
            await self.record_exit(uid, paths, pid)

    async def record_exit(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        record = process.read_launch_record(paths)
        if record is None or record.pid != pid or self.is_attached(uid, pid):
            return
        if process.read_exit_record(paths) is None and not process.is_alive_and_ours(record):
            # With the wait status its supervisor recorded, if it had one.
            process.record_exit(paths, record, now=self._clock.now())
            log.info("vm_exit_recorded_late", uid=uid, pid=pid)

    async def signal(self, uid: str, paths: RuntimePaths, pid: int, signal: int) -> None:
        # The watched process's record also serves when its runtime dir is gone.
        record = self.attached_record(uid) or process.read_launch_record(paths)
        if record is not None and record.pid == pid:
            process.send_signal(record, signal)
            log.info("vm_killed", uid=uid, pid=pid, signal=signal)

    async def kill_lost(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        if process.find_lost(paths) == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signals.SIGKILL)
            log.info("vm_killed", uid=uid, pid=pid, signal=signals.SIGKILL, lost=True)

    async def clean(self, uid: str, paths: RuntimePaths) -> None:
        process.clear_stale_files(paths)

    async def remove(self, uid: str, paths: RuntimePaths) -> None:
        await self.detach(uid)
        await asyncio.to_thread(shutil.rmtree, paths.directory, True)

    async def write_seed(self, path: PurePath, files: Mapping[str, bytes]) -> None:
        await asyncio.to_thread(write_seed, Path(path), dict(files))

    async def qmp_state(self, uid: str) -> QmpState:
        """The guest's run state, or UNREACHABLE if QMP does not answer in time."""
        attachment = self._attached.get(uid)
        if attachment is None:
            return QmpState.UNREACHABLE
        if (
            attachment.known_state is not None
            and self._clock.monotonic() - attachment.known_at < STATE_TRUST_SECONDS
        ):
            return attachment.known_state
        if attachment.monitor is None or not attachment.monitor.is_connected:
            await self._connect_monitor(attachment)
        if attachment.monitor is None:
            return QmpState.UNREACHABLE
        try:
            with TRACER.start_as_current_span(
                "qmp query-status", attributes={"process.pid": attachment.record.pid}
            ):
                status = await attachment.monitor.query_status()
        except (MonitorUnavailable, MonitorCommandFailed):
            return QmpState.UNREACHABLE
        state = QmpState.PRELAUNCH if status == "inmigrate" else _QMP_STATES.get(status, QmpState.OTHER)
        self._learn(attachment, state)
        return state

    async def command(self, uid: str, command: str) -> None:
        await self.qmp(uid, command, within=COMMAND_TIMEOUT_SECONDS)

    async def qmp(self, uid: str, name: str, args: dict[str, Any] | None = None, *, within: float) -> object:
        """Run a QMP command on `uid`'s QEMU; its reply. :raise CommandUnanswered, CommandRefused."""
        attachment = self._attached.get(uid)
        try:
            with TRACER.start_as_current_span(f"qmp {name}") as span:
                if attachment is None or attachment.monitor is None:
                    raise MonitorUnavailable(f"no QMP connection to run {name}")
                span.set_attribute("process.pid", attachment.record.pid)
                reply = await attachment.monitor.execute(name, args, within=within)
        except MonitorUnavailable as err:
            raise CommandUnanswered(str(err)) from err
        except MonitorCommandFailed as err:
            raise CommandRefused(str(err)) from err
        if name in _COMMAND_STATES:
            self._learn(attachment, _COMMAND_STATES[name])
        return reply

    def _learn(self, attachment: _Attachment, state: QmpState) -> None:
        attachment.known_state = state
        attachment.known_at = self._clock.monotonic()

    async def _connect_monitor(self, attachment: _Attachment) -> None:
        if attachment.monitor is not None:
            await attachment.monitor.close()
            attachment.monitor = None
        try:
            directory = os.open(attachment.paths.directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            # A short path to the socket whatever the data dir's depth (sun_path holds 107 bytes).
            attachment.monitor = await Monitor.connect(
                Path(f"/proc/self/fd/{directory}/{QMP_SOCKET_NAME}"),
                name=attachment.uid,
                within=QMP_CONNECT_SECONDS if attachment.fresh else QMP_RECONNECT_SECONDS,
                while_=lambda: self._attached.get(attachment.uid) is attachment,
            )
        except MonitorUnavailable as err:
            if self._attached.get(attachment.uid) is attachment:
                log.warning("qmp_unavailable", uid=attachment.uid, pid=attachment.record.pid, error=str(err))
            return
        finally:
            os.close(directory)
        attachment.fresh = False
        attachment.events = self._tasks.create_task(
            self._read_events(attachment, attachment.monitor), name=f"qmp-events-{attachment.uid}"
        )

    async def _read_events(self, attachment: _Attachment, monitor: Monitor) -> None:
        try:
            async for event in monitor.events():
                name = event.get("event")
                data = event.get("data") or {}
                if name == "SHUTDOWN":
                    attachment.shutdown_at = _event_time(event)
                    if data.get("guest"):
                        process.mark_guest_shutdown(attachment.paths)
                if name == "NIC_RX_FILTER_CHANGED":
                    attachment.guest_booted = True
                if name in _EVENT_STATES:
                    self._learn(attachment, _EVENT_STATES[name])
                log.info("qmp_event", uid=attachment.uid, qmp_event=name, reason=data.get("reason"))
                self._wake(attachment.uid)
        except MonitorUnavailable:
            return

    def _on_exit(self, uid: str) -> None:
        attachment = self._attached.get(uid)
        if attachment is not None and self._supervisor_lost(attachment):
            return
        attachment = self._forget(uid)
        if attachment is None:
            return
        if attachment.shutdown_at is not None:
            self._exit_detected(max(0.0, time.time() - attachment.shutdown_at))
        self._record_exit(uid, attachment.paths, attachment.record, attachment.child)
        self._tasks.create_task(self._release(attachment), name=f"qmp-close-{uid}")

    def _supervisor_lost(self, attachment: _Attachment) -> bool:
        """The supervisor ended while QEMU runs on (someone killed it): follow QEMU itself."""
        record = attachment.record
        if attachment.watched_pid == record.pid or not process.is_alive_and_ours(record):
            return False
        if process.read_wait_status(attachment.paths, record.pid) is not None:
            return False
        try:
            pidfd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            return False
        log.warning("supervisor_lost", uid=attachment.uid, pid=record.pid, supervisor=attachment.watched_pid)
        loop = asyncio.get_running_loop()
        loop.remove_reader(attachment.pidfd)
        os.close(attachment.pidfd)
        if attachment.child is not None:
            attachment.child.poll()  # reap it
        attachment.pidfd, attachment.watched_pid = pidfd, record.pid
        loop.add_reader(pidfd, self._on_exit, attachment.uid)
        return True

    def _record_exit(
        self,
        uid: str,
        paths: RuntimePaths,
        record: process.LaunchRecord,
        child: subprocess.Popen[bytes] | None,
    ) -> None:
        if child is not None:
            child.poll()  # reap the supervisor; QEMU's own status is in the file it wrote
        status = process.record_exit(paths, record, now=self._clock.now())
        code, signal = (status.exit_code, status.signal) if status else (None, None)
        log.info("vm_exit_detected", uid=uid, pid=record.pid, exit_code=code, signal=signal)
        self._wake(uid)

    async def _release(self, attachment: _Attachment) -> None:
        asyncio.get_running_loop().remove_reader(attachment.pidfd)
        with contextlib.suppress(OSError):
            os.close(attachment.pidfd)
        if attachment.events is not None:
            attachment.events.cancel()
        if attachment.monitor is not None:
            await attachment.monitor.close()


async def _nic_configured(monitor: Monitor | None) -> bool:
    """For a process this controller did not start (it missed the event): ask QEMU. Unknown
    counts as booted, so a guest whose state is unknown still gets its full stopTimeout."""
    if monitor is None:
        return True
    try:
        return await monitor.nic_configured()
    except (MonitorUnavailable, MonitorCommandFailed):
        return True


def open_pidfd(record: process.LaunchRecord) -> tuple[int, int] | None:
    """A pidfd on QEMU's supervisor if it runs, else on QEMU; with the pid it follows. None:
    both are gone."""
    if record.supervisor is not None:
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(record.supervisor[0])
            # Checked once the pidfd pins the pid: a reused pid is not taken for the supervisor.
            if process.supervisor_alive(record):
                return pidfd, record.supervisor[0]
            os.close(pidfd)
    try:
        return os.pidfd_open(record.pid), record.pid
    except ProcessLookupError:
        return None


def _alive(record: process.LaunchRecord, paths: RuntimePaths, *, watched: bool) -> bool:
    """`record`'s process runs and is ours; one not watched yet must match the pidfile too."""
    if watched:
        return process.is_alive_and_ours(record, identity_proven=True)
    pidfile_pid = process.read_pidfile(paths)
    return (pidfile_pid is None or pidfile_pid == record.pid) and process.is_alive_and_ours(record)


def _event_time(event: dict[str, object]) -> float | None:
    """A QMP event's timestamp ({"seconds", "microseconds"}, host wall clock) in epoch seconds."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(seconds, int) or not isinstance(micros, int):
        return None
    return seconds + micros / 1_000_000
