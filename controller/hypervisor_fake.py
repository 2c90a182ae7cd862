"""An in-memory Hypervisor: the fake of controller/hypervisor.py, shipped beside it.

Processes are records in dicts and time is the injected clock's, so a table test of the
reconciler runs in milliseconds. It passes the same contract tests as the QEMU runtime
(tests/component/test_hypervisor_contract.py). Besides the Protocol it has the world's side,
for tests: a crash, a hang, a controller restart, a runtime dir removed under a process.
"""

from __future__ import annotations

import itertools
import signal as signals
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePath

from controller.clock import Clock
from controller.hypervisor import AlreadyRunning, CommandRefused, CommandUnanswered, ProcessView, Spawned
from controller.model import ExitObservation, ProcessObservation, QmpState
from controller.qemu.argv import RuntimePaths


@dataclass(slots=True)
class FakeProcess:
    pid: int
    argv: tuple[str, ...]
    digest: str
    started_at: datetime
    qmp: QmpState = QmpState.PRELAUNCH
    alive: bool = True
    watched: bool = True
    # Started under a supervisor, which records its wait status: its exit code or signal is
    # known even when nobody watched it end (False: a QEMU from before supervisors).
    supervised: bool = True
    # How it ended (exit code, signal), once it has.
    ended: tuple[int | None, int | None] | None = None
    hung: bool = False
    # The guest powers off when the power button is pressed.
    obeys_powerdown: bool = True
    # QEMU ends at `quit` (a wedged one does not).
    obeys_quit: bool = True
    # Its runtime dir was removed under it.
    dir_removed: bool = False


@dataclass(slots=True)
class FakeHypervisor:
    clock: Clock
    wake: Callable[[str], None] = lambda _uid: None
    processes: dict[str, FakeProcess] = field(default_factory=dict)
    exits: dict[str, ExitObservation] = field(default_factory=dict)
    runtime_dirs: set[str] = field(default_factory=set)
    seeds: dict[PurePath, Mapping[str, bytes]] = field(default_factory=dict)
    # Every command and signal sent, in order: what tests assert on.
    commands: list[tuple[str, str]] = field(default_factory=list)
    signals: list[tuple[str, int, int]] = field(default_factory=list)
    # The next spawn of these uids fails with this stderr (a bad kernel, a busy port).
    failing_spawns: dict[str, str] = field(default_factory=dict)
    # The next spawn of these uids gives a QEMU that connects but answers no command (hung).
    silent_spawns: set[str] = field(default_factory=set)
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(4000))

    # The Protocol.
    async def inspect(self, uid: str, paths: RuntimePaths, *, expect_process: bool) -> ProcessView:
        proc = self.processes.get(uid)
        found: ProcessObservation | None = None
        # A process nobody watches is found by its launch record, which went with its dir.
        visible = proc is not None and (proc.watched or not proc.dir_removed)
        if proc is not None and proc.alive and visible:
            answering = proc.watched and not proc.hung and not proc.dir_removed
            found = ProcessObservation(
                pid=proc.pid,
                argv_digest=proc.digest,
                started_at=proc.started_at,
                qmp=proc.qmp if answering else QmpState.UNREACHABLE,
                runtime_intact=not proc.dir_removed,
                watched=proc.watched,
            )
        exit_ = self.exits.get(uid)
        dead = proc is not None and not proc.alive and visible
        lost = proc is not None and proc.alive and not visible and expect_process
        return ProcessView(
            process=found,
            exit=exit_,
            has_runtime_dir=uid in self.runtime_dirs,
            has_stale_runtime=dead or exit_ is not None,
            unrecorded_exit_pid=proc.pid if dead and exit_ is None and proc is not None else None,
            lost_pid=proc.pid if lost and proc is not None else None,
        )

    async def spawn(
        self, uid: str, paths: RuntimePaths, argv: tuple[str, ...], digest: str
    ) -> Spawned | None:
        current = self.processes.get(uid)
        if current is not None and current.alive:
            raise AlreadyRunning(f"another process of {uid} holds its runtime lock")
        self.exits.pop(uid, None)
        self.runtime_dirs.add(uid)
        now = self.clock.now()
        failure = self.failing_spawns.pop(uid, None)
        if failure is not None:
            self.processes.pop(uid, None)
            self.exits[uid] = ExitObservation(now, 127, None, False, now, failure)
            return None
        proc = FakeProcess(next(self._pids), argv, digest, now, hung=uid in self.silent_spawns)
        self.silent_spawns.discard(uid)
        self.processes[uid] = proc
        return Spawned(proc.pid, monitor_ready=True)

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        proc = self._ours(uid, pid)
        if proc is None:
            return
        if proc.alive:
            proc.watched = True
        else:
            await self.record_exit(uid, paths, pid)

    async def record_exit(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        proc = self._ours(uid, pid)
        if proc is not None and not proc.alive and not proc.watched and uid not in self.exits:
            code, signal = proc.ended or (None, None)
            self.exits[uid] = ExitObservation(self.clock.now(), code, signal, False, proc.started_at)

    async def command(self, uid: str, command: str) -> None:
        proc = self.processes.get(uid)
        if proc is None or not proc.alive or not proc.watched or proc.hung or proc.dir_removed:
            raise CommandUnanswered(f"no QMP connection to run {command}")
        self.commands.append((uid, command))
        if command == "cont":
            proc.qmp = QmpState.RUNNING
        elif command == "stop":
            proc.qmp = QmpState.PAUSED
        elif command == "system_powerdown":
            if proc.obeys_powerdown:
                self.exit(uid, code=0, guest_shutdown=True)
        elif command == "quit":
            if proc.obeys_quit:
                self.exit(uid, code=0)
        else:
            raise CommandRefused(f"unknown command {command}")

    async def signal(self, uid: str, paths: RuntimePaths, pid: int, signal: int) -> None:
        proc = self._ours(uid, pid)
        if proc is not None and proc.alive:
            self.signals.append((uid, pid, signal))
            if signal in (signals.SIGKILL, signals.SIGTERM):
                self.exit(uid, signal=signal)

    async def kill_lost(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        proc = self._ours(uid, pid)
        if proc is not None and proc.alive and proc.dir_removed and not proc.watched:
            self.signals.append((uid, pid, signals.SIGKILL))
            del self.processes[uid]  # nothing can record its exit: its dir is gone

    async def clean(self, uid: str, paths: RuntimePaths) -> None:
        proc = self.processes.get(uid)
        if proc is not None and not proc.alive:
            del self.processes[uid]
        self.exits.pop(uid, None)

    async def remove(self, uid: str, paths: RuntimePaths) -> None:
        await self.clean(uid, paths)
        proc = self.processes.get(uid)
        if proc is not None:
            proc.watched = False
            proc.dir_removed = True
        self.runtime_dirs.discard(uid)
        self.seeds = {path: files for path, files in self.seeds.items() if path.parent != paths.directory}

    async def write_seed(self, path: PurePath, files: Mapping[str, bytes]) -> None:
        self.seeds = {old: content for old, content in self.seeds.items() if old.parent != path.parent}
        self.seeds[path] = dict(files)

    # The world's side, for tests.
    def exit(
        self, uid: str, *, code: int | None = None, signal: int | None = None, guest_shutdown: bool = False
    ) -> None:
        """The process of `uid` ends. A watched one has its exit recorded and its VM woken at
        once; one nobody watches leaves no record (the next look finds it dead)."""
        proc = self.processes[uid]
        proc.alive = False
        proc.ended = (code, signal) if proc.supervised else None
        if not proc.watched:
            return
        proc.watched = False
        code, signal = proc.ended or (None, None)
        self.exits[uid] = ExitObservation(self.clock.now(), code, signal, guest_shutdown, proc.started_at)
        self.wake(uid)

    def pause_from_outside(self, uid: str) -> None:
        """Someone else's QMP `stop` (or QEMU's own pause) on the running process of `uid`."""
        self.processes[uid].qmp = QmpState.PAUSED
        self.wake(uid)

    def restart_controller(self) -> None:
        """A new controller: nothing is watched (the supervisors go on recording exits)."""
        for proc in self.processes.values():
            proc.watched = False

    def remove_runtime_dir(self, uid: str) -> None:
        """Someone removed `uid`'s runtime dir (and so its launch record and QMP socket)."""
        self.runtime_dirs.discard(uid)
        self.exits.pop(uid, None)
        proc = self.processes.get(uid)
        if proc is not None:
            proc.dir_removed = True
            if not proc.alive:
                del self.processes[uid]

    def pid_of(self, uid: str) -> int | None:
        proc = self.processes.get(uid)
        return proc.pid if proc is not None and proc.alive else None

    def _ours(self, uid: str, pid: int) -> FakeProcess | None:
        proc = self.processes.get(uid)
        return proc if proc is not None and proc.pid == pid else None
