"""The Hypervisor Protocol: what the reconciler asks of the processes that run VMs.

controller/qemu/runtime.py `Runtime` implements it with QEMU (pidfd, QMP, files in the
runtime dir); controller/hypervisor_fake.py `FakeHypervisor` implements it in memory for table
tests. Both pass tests/component/test_hypervisor_contract.py.

Reading and acting are apart: `inspect` only looks (observe calls it), every other method is an
action the executor performs. The exit source is the implementation's own: it watches every
process it spawned or attached, writes the exit record the moment the process is gone, and
wakes the VM (the `wake(uid)` it was built with), so an exit is counted exactly once even if
the controller dies right after.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Protocol

from controller.model import ExitObservation, ProcessObservation
from controller.qemu.argv import RuntimePaths


class AlreadyRunning(Exception):
    """Another process of this VM holds its runtime lock: nothing was started. Retry later."""


class CommandUnanswered(Exception):
    """The monitor is not connected or did not answer in time. Retry, or treat it as hung."""


class CommandRefused(Exception):
    """The process answered with an error: the command is wrong for its state."""


@dataclass(frozen=True, slots=True)
class ProcessView:
    """What `inspect` saw of one VM's process side. Read-only: looking changes nothing."""

    # The live process proven ours, or None. `process.watched` says whether it is attached.
    process: ProcessObservation | None
    exit: ExitObservation | None
    has_runtime_dir: bool
    # Files left by a process that is gone (pidfile, socket, launch or exit record).
    has_stale_runtime: bool
    # Watched, its leader gone, its exit not recorded yet (the runtime lock is still held).
    exiting: bool = False
    # A process of ours that died while nobody watched it, its exit not recorded yet.
    unrecorded_exit_pid: int | None = None
    # A QEMU of this VM that lost its runtime dir (looked for only when one was expected).
    lost_pid: int | None = None


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int
    # Its monitor answered: commands (`cont`) can be sent.
    monitor_ready: bool


class Hypervisor(Protocol):
    async def inspect(self, uid: str, paths: RuntimePaths, *, expect_process: bool) -> ProcessView:
        """Look at `uid`'s process, runtime dir and exit record. Changes nothing.

        `expect_process`: status names a pid, so a process missing from the records is looked
        for (a scan of /proc for the real one).
        """
        ...

    async def spawn(
        self, uid: str, paths: RuntimePaths, argv: tuple[str, ...], digest: str
    ) -> Spawned | None:
        """Start the process paused and watch it. A process that cannot start leaves an exit
        record saying why and returns None (it is counted like any crash).

        :raise AlreadyRunning: another process of this VM exists.
        """
        ...

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        """Watch `pid`, a live process of ours nobody watches (adoption after a restart).
        A process that is gone meanwhile gets its exit recorded instead."""
        ...

    async def record_exit(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        """Record the exit of `pid`, which died while nobody watched it. Idempotent."""
        ...

    async def command(self, uid: str, command: str) -> None:
        """Run a monitor command (`cont`, `system_powerdown`, `quit`) on the watched process.

        :raise CommandUnanswered: not connected, or no answer in time.
        :raise CommandRefused: the process answered with an error.
        """
        ...

    async def signal(self, uid: str, paths: RuntimePaths, pid: int, signal: int) -> None:
        """Send `signal` to `pid` if it is still our process of `uid`; a gone one is success."""
        ...

    async def kill_lost(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        """SIGKILL `pid` if it is still the lost process of `uid` (no runtime dir to manage it)."""
        ...

    async def clean(self, uid: str, paths: RuntimePaths) -> None:
        """Remove what a dead process left (pidfile, socket, launch and exit records)."""
        ...

    async def remove(self, uid: str, paths: RuntimePaths) -> None:
        """Stop watching `uid` and remove its runtime dir. Legal only when nothing runs."""
        ...

    async def write_seed(self, path: PurePath, files: Mapping[str, bytes]) -> None:
        """Write the cloud-init seed ISO holding `files` at `path` (in the runtime dir) and
        remove older seeds."""
        ...
