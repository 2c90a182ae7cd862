"""The "bare" baseline (a QEMU spawned from the argv the controller used, watched through a
pidfd, continued over QMP, with nothing else) and the workspace that owns everything a
benchmark starts and cleans it up on any exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from _common import (
    CLEANUP_STOP_GRACE_S,
    KILL_WAIT_S,
    QMP_COMMAND_TIMEOUT_S,
    QMP_CONNECT_TIMEOUT_S,
    REPO_ROOT,
    BenchError,
    interrupt_on_signals,
    progress,
    server_layout,
)
from _procfs import kill_qemus
from _server import Server

from controller.qemu.argv import RuntimePaths
from controller.qemu.monitor import Monitor, MonitorUnavailable


def launch_argv(runtime: RuntimePaths) -> tuple[str, ...]:
    """The argv the controller spawned, from its launch record."""
    data = json.loads(Path(runtime.record).read_text())
    return tuple(data["argv"])


def launch_pid(runtime: RuntimePaths) -> int:
    return int(json.loads(Path(runtime.record).read_text())["pid"])


def started_epoch(runtime: RuntimePaths) -> float:
    """When the controller spawned the current process (launch record `startedAt`)."""
    return datetime.fromisoformat(json.loads(Path(runtime.record).read_text())["startedAt"]).timestamp()


def rehome_argv(argv: Sequence[str], old: Path, new: Path) -> tuple[str, ...]:
    """The same argv with the runtime dir `old` replaced by `new` (pidfile, QMP socket, serial)."""
    if not any(str(old) in arg for arg in argv):
        raise BenchError(f"the launch argv does not name {old}")
    return tuple(arg.replace(str(old), str(new)) for arg in argv)


# --------------------------------------------------------------------------------------------
# The bare baseline


@dataclass
class BareVM:
    """One QEMU started the minimal way: Popen, pidfd, QMP `cont`. No store, no reconcile."""

    argv: tuple[str, ...]
    paths: RuntimePaths
    # How long QMP may take to answer after the spawn (hack/bench/converge scales it with N).
    connect_within: float = QMP_CONNECT_TIMEOUT_S
    process: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    client: Monitor | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        """Spawn paused, connect QMP (retrying while the socket is not there yet), `cont`.

        :raise BenchError: QEMU exited or QMP did not answer in time.
        """
        directory = Path(self.paths.directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in (self.paths.pidfile, self.paths.qmp_socket):
            Path(stale).unlink(missing_ok=True)
        # A blocking Popen in the event loop, as the controller's spawn does (process.py): the
        # baseline pays the same fork/exec cost in the same place.
        with open(self.paths.stderr_log, "wb") as stderr:  # noqa: ASYNC230
            self.process = subprocess.Popen(  # noqa: ASYNC220
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
                cwd=directory,
            )
        BARE_PROCESSES.append(self.process)
        self.pidfd = os.pidfd_open(self.process.pid)
        self.client = await self._connect()
        await self.client.execute("cont", within=QMP_COMMAND_TIMEOUT_S)

    async def _connect(self) -> Monitor:
        process = self.process
        try:
            return await Monitor.connect(
                Path(self.paths.qmp_socket),
                name=self.paths.directory.name,
                within=self.connect_within,
                while_=lambda: process is not None and process.poll() is None,
            )
        except MonitorUnavailable as err:
            if process is not None and process.poll() is not None:
                raise BenchError(f"bare QEMU exited {process.returncode}") from err
            raise BenchError(f"bare QEMU's QMP did not answer: {err}") from err

    async def wait_exit(self) -> float:
        """Wait until the process ends (pidfd readable); returns the epoch time it was seen."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[float] = loop.create_future()

        def on_readable() -> None:
            if not exited.done():
                exited.set_result(time.time())

        loop.add_reader(self.pidfd, on_readable)
        try:
            return await exited
        finally:
            loop.remove_reader(self.pidfd)

    async def respawn(self) -> None:
        """After an exit: reap, let go of the old pidfd and QMP client, and start again."""
        await self.close()
        await self.start()

    async def close(self) -> None:
        """Kill and reap; idempotent."""
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, KILL_WAIT_S)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


# Every bare QEMU ever started, so cleanup can reap them whatever went wrong.
BARE_PROCESSES: list[subprocess.Popen[bytes]] = []


# --------------------------------------------------------------------------------------------
# The workspace


class Workspace:
    """A temporary dir that owns the servers and QEMUs of one benchmark run.

    On exit, in every case: servers are stopped, bare QEMUs killed and reaped, and any QEMU
    whose command line names the dir (the controller's, which outlive the server by design)
    is killed. The dir is removed unless `keep`.
    """

    def __init__(self, name: str, *, keep: bool) -> None:
        # Short: QMP socket paths (DIR/data/run/<uid>/qmp.sock) must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix=f"tqb-{name}-"))
        self.keep = keep
        self._servers: list[Server] = []

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def images_dir(self) -> Path:
        return server_layout(self.data_dir).images_dir

    def __enter__(self) -> Workspace:
        interrupt_on_signals()
        return self

    def __exit__(self, *exc: object) -> None:
        # A second Ctrl-C must not cut the cleanup short; it is bounded (a few seconds).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop(grace=CLEANUP_STOP_GRACE_S)
        for process in BARE_PROCESSES:
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(KILL_WAIT_S)
        killed = kill_qemus(self.root)
        if killed:
            progress(f"killed {killed} QEMU process(es) left under {self.root}")
        if self.keep:
            progress(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def start_server(
        self,
        name: str = "server",
        *,
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
        tree: Path = REPO_ROOT,
    ) -> Server:
        """A server on the workspace's data dir, or on `data_dir` (a second server beside it),
        running the code of `tree` (`python -m` imports from its working directory first)."""
        log_path = self.root / f"{name}.log"
        server = Server(data_dir or self.data_dir, log_path, extra_args=extra_args, tree=tree)
        self._servers.append(server)
        server.start()
        return server


# --------------------------------------------------------------------------------------------
