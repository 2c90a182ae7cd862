"""The server under test (`python -m controller.cli serve`) and its JSON log, read as events with
epoch timestamps: how the benchmarks see what the controller did and when, without polling the
API of the server they measure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (
    HTTP_TIMEOUT_S,
    LOG_POLL_S,
    PASSWORD,
    PORT_RANGE,
    REPO_ROOT,
    SERVER_READY_TIMEOUT_S,
    SERVER_STOP_TIMEOUT_S,
    USER,
    BenchError,
    basic_auth,
    free_port,
    http_request,
    progress,
    project_vms,
    server_layout,
)

from api.testing.tfstate import encode, vm_state
from controller.layout import DataLayout
from controller.qemu.argv import RuntimePaths


def iso_epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class LogEvent:
    name: str
    at: float
    fields: Mapping[str, Any]

    def get(self, key: str) -> Any:
        return self.fields.get(key)


class ServerLog:
    """Incremental reader of the server's JSON-lines log (TOFU_QEMU_LOG_FORMAT=json)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""
        self.history: list[LogEvent] = []

    def read_new(self) -> list[LogEvent]:
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                data = json.loads(line)
                events.append(LogEvent(str(data["event"]), iso_epoch(data["timestamp"]), data))
            except (ValueError, KeyError, TypeError):
                continue
        self.history += events
        return events

    def drain(self) -> None:
        """Skip everything logged so far."""
        self.read_new()

    def wait_for(self, is_done: Callable[[LogEvent], bool], *, timeout: float, what: str) -> None:
        """Feed each new event to `is_done` until it returns True. :raise BenchError: timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.read_new():
                if is_done(event):
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(LOG_POLL_S)


class Server:
    """`python -m controller.cli serve` on a free loopback port with its own data dir."""

    def __init__(
        self, data_dir: Path, log_path: Path, *, extra_args: Sequence[str] = (), tree: Path = REPO_ROOT
    ) -> None:
        # `tree`: the source tree whose code runs (another checkout, to compare two versions).
        self.tree = tree
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = ServerLog(log_path)
        self._extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._serials: dict[str, int] = {}

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def layout(self) -> DataLayout:
        return server_layout(self.data_dir)

    @property
    def run_root(self) -> Path:
        return self.layout.run_root

    @property
    def images_dir(self) -> Path:
        return self.layout.images_dir

    def runtime(self, uid: str) -> RuntimePaths:
        return self.layout.runtime(uid)

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
        env |= {"TOFU_QEMU_USERS": f"{USER}:{PASSWORD}", "TOFU_QEMU_LOG_FORMAT": "json"}
        argv = [sys.executable, "-m", "controller.cli", "serve", "--data-dir", str(self.data_dir)]
        argv += ["--listen", f"127.0.0.1:{self.port}", "--port-range", PORT_RANGE, *self._extra_args]
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                argv,
                cwd=self.tree,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BenchError(f"the server exited with {self._process.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/readyz", timeout=1.0)[0] == 200:
                    progress(f"server pid {self.pid} ready on {self.base_url} (log {self.log_path})")
                    return
            time.sleep(0.05)
        raise BenchError(f"the server was not ready within {SERVER_READY_TIMEOUT_S:.0f} s")

    def stop(self, *, grace: float = SERVER_STOP_TIMEOUT_S) -> None:
        """SIGTERM (the controller lets go of its VMs without stopping them), then SIGKILL."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        progress(f"server pid {process.pid} stopped (exit {process.returncode})")

    def check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            raise BenchError(f"the server is not running: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "log tail:\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "no server log"

    def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout: float = HTTP_TIMEOUT_S
    ) -> tuple[int, bytes]:
        # Always http://127.0.0.1:PORT built above.
        return http_request(method, self.base_url + path, body, authorization=basic_auth(), timeout=timeout)

    def post_vms(self, project: str, vms: Mapping[str, Mapping[str, Any]]) -> None:
        """Publish a state declaring exactly `vms` (name -> spec) in `project`."""
        serial = self._serials.get(project, 0) + 1
        self._serials[project] = serial
        body = encode(vm_state(serial, {name: dict(spec) for name, spec in vms.items()}))
        status, answer = self.request("POST", f"/state/{project}", body)
        if status != 200:
            raise BenchError(f"POST /state/{project}: {status} {answer[:300]!r}")

    def vms(self, project: str) -> list[dict[str, Any]]:
        return project_vms(self.request, project, BenchError)

    def uids(self, project: str) -> dict[str, str]:
        """name -> uid of the project's VMs."""
        return {item["metadata"]["name"]: item["metadata"]["uid"] for item in self.vms(project)}

    def wait_running(self, uids: set[str], *, timeout: float) -> dict[str, float]:
        """Wait for a `status_written` Running of every uid in the log (new events only).

        Returns uid -> the time (epoch) the server wrote that status.
        """
        running: dict[str, float] = {}

        def is_done(event: LogEvent) -> bool:
            uid = event.get("uid")
            if event.name == "status_written" and uid in uids and event.get("phase") == "Running":
                running.setdefault(uid, event.at)
            return len(running) == len(uids)

        self.log.wait_for(is_done, timeout=timeout, what=f"{len(uids)} VMs Running")
        return running

    def delete_all(self, project: str, *, timeout: float) -> float:
        """Publish an empty state and wait until the project has no VM. Returns seconds taken."""
        started = time.monotonic()
        self.post_vms(project, {})
        while self.vms(project):
            if time.monotonic() - started > timeout:
                raise BenchError(f"VMs of {project} still listed {timeout:.0f} s after an empty state")
            self.check_alive()
            time.sleep(0.1)
        return time.monotonic() - started
