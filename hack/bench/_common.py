"""Shared parts of the controller benchmarks hack/bench/{converge,recover,idle}.

What every benchmark here needs, in one place:
- a workspace (a temporary dir) that owns everything started in it and, on any exit (normal,
  error, Ctrl-C or SIGTERM), stops the server, kills every QEMU whose command line names the
  workspace and removes the dir (unless --keep);
- the server under test: `python -m controller.cli serve` with JSON logs in a file, and a
  reader that turns the log into events with epoch timestamps. The log is how the benchmarks
  see what the controller did and when, without polling the API (which would load the
  server they measure);
- the "bare" baseline: a QEMU spawned from the same argv the controller used (its launch
  record), watched through a pidfd, connected over QMP and continued, with nothing else;
- /proc readings: CPU seconds, precise on-CPU nanoseconds (schedstat), RSS, machine busy time.

Timestamps: the server stamps its log in UTC with microseconds (structlog TimeStamper), and the
benchmarks read `time.time()` on the same machine, so differences between the two are valid.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def _reexec_in_venv() -> None:
    """The scripts start with `#!/usr/bin/env python3`; they need the project's virtualenv."""
    if sys.prefix == sys.base_prefix and VENV_PYTHON.exists() and os.environ.get("TQB_REEXEC") != "1":
        os.environ["TQB_REEXEC"] = "1"
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])  # noqa: S606 - same script, same args


_reexec_in_venv()
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from api.testing.tfstate import encode, vm_state  # noqa: E402
from controller.layout import DataLayout  # noqa: E402
from controller.qemu.argv import RuntimePaths  # noqa: E402
from controller.qemu.monitor import Monitor, MonitorUnavailable  # noqa: E402
from controller.settings import ControllerSettings  # noqa: E402

USER, PASSWORD = "bench", "bench"
GUEST_READY_MARKER = b"TOFU-GUEST-READY"
SERVER_READY_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
# On the way out the server's drain is not worth waiting for: its VMs are killed anyway.
CLEANUP_STOP_GRACE_S = 3.0
HTTP_TIMEOUT_S = 30.0
QMP_CONNECT_TIMEOUT_S = 10.0
QMP_COMMAND_TIMEOUT_S = 5.0
# The bare baseline retries a QMP connect this often (the socket appears ~25 ms after spawn).
KILL_WAIT_S = 10.0
LOG_POLL_S = 0.01
# Host ports for forwards the benchmark VMs never ask for; a range the other benchmarks avoid.
PORT_RANGE = "41000-41999"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a dead server, a VM that never ran)."""


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interrupt_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so the workspace always cleans up.

    SIGINT is set explicitly because a shell starts background jobs with it ignored, and a
    benchmark that owns 50 VMs must not survive its Ctrl-C or kill.
    """

    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# --------------------------------------------------------------------------------------------
# Specs and the guest image


def guest_spec(*, memory_mib: int) -> dict[str, Any]:
    """The benchmark VM: the tiny guest on q35/TCG with no forwards and no disks.

    stopTimeout 0 makes a delete go straight from the power button to `quit`, so tearing down
    guests that have not booted yet (and so ignore ACPI) takes milliseconds, not 30 s.
    """
    return {
        "memory": memory_mib,
        "machine": "q35",
        "accel": "tcg",
        "stopTimeout": 0,
        "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
    }


def install_guest(images_dir: Path) -> None:
    """Build (or reuse from the cache) the tiny guest and install it as images_dir/tiny-guest/."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "build-guest"), "--images-dir", str(images_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"hack/build-guest failed ({done.returncode}):\n{done.stderr[-3000:]}")
    progress(f"tiny guest installed in {images_dir} ({time.monotonic() - started:.1f} s)")


def is_guest_ready(serial_log: Path) -> bool:
    try:
        return GUEST_READY_MARKER in serial_log.read_bytes()
    except FileNotFoundError:
        return False


def wait_guests_ready(serial_logs: Sequence[Path], *, timeout: float) -> tuple[int, float]:
    """Wait until every serial log shows the ready marker, or the timeout. Returns (ready, seconds)."""
    started = time.monotonic()
    pending = list(serial_logs)
    while pending and time.monotonic() - started < timeout:
        pending = [path for path in pending if not is_guest_ready(path)]
        if pending:
            time.sleep(0.25)
    return len(serial_logs) - len(pending), time.monotonic() - started


# --------------------------------------------------------------------------------------------
# /proc readings


def read_proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after "(comm)": [0] is the state, [11] utime, [12] stime."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; NaN once it is gone."""
    fields = read_proc_stat(pid)
    if fields is None:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def oncpu_ns(pid: int) -> int:
    """Nanoseconds all threads of `pid` have spent on a CPU (schedstat, exact, unlike the
    10 ms ticks of /proc/PID/stat). Threads that already exited are missed; the server's
    are long-lived (the event loop, aiosqlite's connection thread, the default executor)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent in user, nice and system mode since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return sum(int(value) for value in fields[1:4]) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def is_alive(pid: int) -> bool:
    """Running and not a zombie: PID 1 reaps orphans lazily here
    (docs/guest.md#qemu-behaviours-the-code-relies-on)."""
    fields = read_proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def qemu_processes(root: Path) -> dict[int, float]:
    """Live QEMU processes whose command line names `root`, with their CPU seconds."""
    found: dict[int, float] = {}
    needle = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        argv = raw.split(b"\0")
        if not argv or not os.path.basename(argv[0]).startswith(b"qemu-system") or needle not in raw:
            continue
        pid = int(entry)
        if is_alive(pid):
            found[pid] = cpu_seconds(pid)
    return found


def kill_qemus(root: Path) -> int:
    """SIGKILL every QEMU naming `root` and wait until none runs. Returns how many were killed."""
    victims = list(qemu_processes(root))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while any(is_alive(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(victims)


@dataclass
class LoadMeter:
    """Machine load that is not ours during a measurement (other benchmarks, builds...).

    Ours is this script, the server and every QEMU under the workspace. CPU of processes that
    exited between samples is lost (counted as foreign): call `sample()` before killing one.
    """

    root: Path
    server_pid: int | None
    started: float = field(default_factory=time.monotonic)
    machine: float = field(default_factory=machine_busy_seconds)
    own_self: float = field(default_factory=self_cpu_seconds)
    server: float = 0.0
    qemu_first: dict[int, float] = field(default_factory=dict)
    qemu_last: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        self.qemu_first = qemu_processes(self.root)
        self.qemu_last = dict(self.qemu_first)

    def sample(self) -> None:
        for pid, seconds in qemu_processes(self.root).items():
            self.qemu_last[pid] = seconds

    def foreign_cores(self) -> float:
        """Average cores used by other processes since the meter started."""
        self.sample()
        wall = time.monotonic() - self.started
        server = (cpu_seconds(self.server_pid) - self.server) if self.server_pid else 0.0
        qemus = sum(seconds - self.qemu_first.get(pid, 0.0) for pid, seconds in self.qemu_last.items())
        own = (self_cpu_seconds() - self.own_self) + (0.0 if math.isnan(server) else server) + qemus
        return max(0.0, (machine_busy_seconds() - self.machine - own) / wall) if wall > 0 else 0.0


def wait_quiet(root: Path, server_pid: int | None, *, max_wait: float, threshold: float = 0.25) -> float:
    """Wait (at most `max_wait` s) for a 1 s window in which other processes use less than
    `threshold` cores; other benchmarks and test suites may share the machine. Returns the
    foreign load of the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = LoadMeter(root, server_pid)
        time.sleep(1.0)
        foreign = meter.foreign_cores()
        if foreign < threshold or time.monotonic() >= deadline:
            if foreign >= threshold:
                progress(f"the machine stayed busy ({foreign:.2f} foreign cores); measuring anyway")
            return foreign


# --------------------------------------------------------------------------------------------
# The server under test and its log


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def basic_auth() -> str:
    return "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def http_request(
    method: str, url: str, body: bytes | None, *, authorization: str | None, timeout: float
) -> tuple[int, bytes]:
    """One request, past any proxy; any status is an answer (a JSON body when there is one).

    :raise OSError: no answer (transport, timeout).
    """
    headers = {"Authorization": authorization} if authorization else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    # The caller's URL: its own loopback server, or the operator's --server.
    request = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def project_vms(
    request: Callable[[str, str], tuple[int, bytes]], project: str, error: type[Exception]
) -> list[dict[str, Any]]:
    """The project's VM objects through `request(method, path)`.

    :raise OSError: no answer. :raise error: an error status.
    """
    status, answer = request("GET", f"/api/v1/projects/{project}/vms")
    if status != 200:
        raise error(f"GET the VMs of {project}: {status} {answer[:300]!r}")
    items: list[dict[str, Any]] = json.loads(answer)["items"]
    return items


def server_layout(data_dir: Path) -> DataLayout:
    """The layout of a server started here: its environment carries no TOFU_QEMU_* setting
    (`Server.start`), so every path is the controller's default for `data_dir`. The run and disks
    roots depend on `data_dir` alone, so they hold for any host's data dir."""
    settings = ControllerSettings.model_construct(data_dir=data_dir)
    return DataLayout(settings.data_dir, settings.resolved_images_dir)


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
                within=QMP_CONNECT_TIMEOUT_S,
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
# Figures and reports


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def machine_info() -> dict[str, Any]:
    binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    qemu = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "qemu": qemu.stdout.splitlines()[0] if qemu.stdout else "unknown",
        "python": sys.version.split()[0],
    }


def write_json(path: Path | None, document: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    progress(f"wrote {path}")
