"""QEMUs and controllers as /proc shows them: whose VM a QEMU is, and the controller the tool kills."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from _common import (
    REPO_ROOT,
    server_layout,
)
from _procfs import qemu_processes

from chaoslib.basics import PROCESS_EXIT_TIMEOUT_S, UNKNOWN_VM
from controller.qemu.argv import RuntimePaths
from controller.qemu.process import (
    is_running_process,
    read_cmdline,
)


def qemu_uid(pid: int, run_root: Path) -> str | None:
    """The VM uid a QEMU belongs to: its -pidfile is DATA/run/<uid>/qemu.pid (argv never changes,
    even when the runtime dir is deleted under it); failing that, its working directory."""
    argv = read_cmdline(pid) or ()
    for flag, value in itertools.pairwise(argv):
        if flag == "-pidfile" and Path(value).parent.parent == run_root:
            return Path(value).parent.name
    with contextlib.suppress(OSError):
        cwd = Path(os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)"))
        if cwd.parent == run_root:
            return cwd.name
    return None


def qemus_by_uid(data_dir: Path) -> dict[str, list[int]]:
    """Live QEMUs (not zombies) whose command line names the data dir, by VM uid (UNKNOWN_VM when
    it cannot be told)."""
    run_root = server_layout(data_dir).run_root
    found: dict[str, list[int]] = {}
    for pid in sorted(qemu_processes(data_dir)):
        found.setdefault(qemu_uid(pid, run_root) or UNKNOWN_VM, []).append(pid)
    return found


def is_qemu_of(pid: int, uid: str, run_root: Path) -> bool:
    return is_running_process(pid) and qemu_uid(pid, run_root) == uid


def runtime_problem(runtime: RuntimePaths, pid: int) -> str | None:
    """What keeps the runtime dir from proving `pid` is the VM's process (what a restarted
    controller adopts from), or None."""
    try:
        record = json.loads(Path(runtime.record).read_text())
    except (OSError, ValueError):
        return "no launch.json" if Path(runtime.directory).is_dir() else "no runtime dir"
    if record.get("pid") != pid:
        return f"launch.json names pid {record.get('pid')}"
    if not Path(runtime.qmp_socket).is_socket():
        return "no qmp.sock"
    return None


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start a process: argv, environment, where its output goes."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path = REPO_ROOT


def start_process(launch: Launch, *, marker: str) -> subprocess.Popen[bytes]:
    """Start in its own session (Ctrl-C of the tool does not reach it), output appended to the log.

    The marker line also ends a JSON line a killed predecessor left unfinished.
    """
    with launch.log_path.open("ab") as log:
        log.write(f"\n---- chaos: {marker}: {shlex.join(launch.argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            launch.argv,
            cwd=launch.cwd,
            env=dict(launch.env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def wait_gone(pid: int, child: subprocess.Popen[bytes] | None) -> None:
    """Wait until `pid` is dead; reap it when it is our child."""
    if child is not None and child.pid == pid:
        child.wait(PROCESS_EXIT_TIMEOUT_S)
        return
    deadline = time.monotonic() + PROCESS_EXIT_TIMEOUT_S
    while is_running_process(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


class Controller:
    """The controller process the tool kills: started again by the tool (`launch`) or by a
    supervisor, recognised by the same command line."""

    def __init__(self, *, pid: int, child: subprocess.Popen[bytes] | None, launch: Launch | None) -> None:
        self.pid: int | None = pid
        self.child = child
        self.launch = launch
        self._cmdline = read_cmdline(pid)
        self.started: list[subprocess.Popen[bytes]] = [child] if child is not None else []

    @property
    def is_up(self) -> bool:
        return self.pid is not None

    def kill(self) -> int:
        """SIGKILL the controller and wait until it is gone. Returns its pid."""
        assert self.pid is not None
        pid = self.pid
        self._cmdline = read_cmdline(pid) or self._cmdline
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, self.child)
        self.pid, self.child = None, None
        return pid

    def restart(self) -> int | None:
        """Start it again (own launch), or look for a supervisor's new one. Returns the new pid."""
        assert self.pid is None
        if self.launch is not None:
            self.child = start_process(self.launch, marker="controller restart")
            self.started.append(self.child)
            self.pid = self.child.pid
        else:
            self.pid = self._find_successor()
        return self.pid

    def _find_successor(self) -> int | None:
        if not self._cmdline:
            return None
        for entry in os.listdir("/proc"):
            if (
                entry.isdigit()
                and read_cmdline(int(entry)) == self._cmdline
                and is_running_process(int(entry))
            ):
                return int(entry)
        return None

    def stop(self) -> None:
        """End every controller the tool started (--spawn teardown)."""
        for child in self.started:
            if child.poll() is None:
                child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(PROCESS_EXIT_TIMEOUT_S)
