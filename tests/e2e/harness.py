"""Real processes for the e2e tests: `tofu-qemu serve|api|controller`, QEMU and the Terraform CLI.

Invariants: every process started here has an owner that kills it (the fixtures in conftest.py),
every wait has a deadline, and nothing is written into the repository tree: configurations are
copied into pytest's tmp dirs. Terraform runs with a scrubbed environment (no inherited `TF_*`,
an empty CLI config, no checkpoint calls), so it never tries the network.

QEMU processes are found the way the controller finds them (DATA/run/<uid>/launch.json), plus
any process whose command line names the data dir, so a teardown kills every QEMU a test caused
even if the controller lost track of it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until
from controller.qemu.process import ProcessIdentity, is_running_process, read_cmdline

REPO_ROOT = Path(__file__).resolve().parents[2]
DB_FILE_NAME = "tofu-qemu.sqlite3"
USER = "alice"
PASSWORD = "s3cret"
SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 10.0
TERRAFORM_TIMEOUT = 60.0
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The controller logs this (JSON) once its workers run; `tofu-qemu controller` has no /readyz.
CONTROLLER_STARTED = '"controller_started"'
T = TypeVar("T")

Command = Literal["serve", "api", "controller"]


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def lock_info(lock_id: str, *, operation: str = "OperationTypeApply") -> bytes:
    """A lock body shaped like Terraform 1.11's (docs/backend.md#locks)."""
    return json.dumps(
        {
            "ID": lock_id,
            "Operation": operation,
            "Info": "",
            "Who": "e2e@test",
            "Version": "1.11.4",
            "Created": "2026-11-21T22:42:33.973646566Z",
            "Path": "",
        }
    ).encode()


def http_request(
    opener: urllib.request.OpenerDirector,
    url: str,
    method: str,
    *,
    body: bytes | None = None,
    auth: tuple[str, str] | None = (USER, PASSWORD),
    timeout: float = HTTP_TIMEOUT,
) -> HttpAnswer:
    """One HTTP request; any status is an answer, only transport failures raise OSError."""
    headers = {"Authorization": basic_auth(*auth)} if auth else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    # Always a 127.0.0.1 URL built by this module's callers, never user input.
    request = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            return HttpAnswer(response.status, response.read())
    except urllib.error.HTTPError as err:
        with err:
            return HttpAnswer(err.code, err.read())


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One `tofu-qemu serve` (or `api`, or `controller`) subprocess, logging to a file.

    Restarting on the same data dir appends to the same log, so a failure report shows every
    incarnation. `serve` and `api` listen on a loopback port; `controller` listens nowhere.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        log_path: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        client_tls: ssl.SSLContext | None = None,
        command: Command = "serve",
        open_files: tuple[int, int] | None = None,
    ) -> None:
        """`extra_args` go to the command; `client_tls` makes requests use HTTPS with that context;
        `open_files` is the (soft, hard) RLIMIT_NOFILE the server starts with."""
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_loopback_port()
        self.command: Command = command
        self._extra_args = tuple(extra_args)
        self._open_files = open_files
        self._opener = (
            urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=client_tls)
            )
            if client_tls
            else _NO_PROXY
        )
        self._scheme = "https" if client_tls else "http"
        self._process: subprocess.Popen[bytes] | None = None
        # Added to the environment of the next start (e.g. a fault-injection point).
        self.extra_env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILE_NAME

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.is_running and self._process is not None else None

    def state_url(self, project: str) -> str:
        return f"{self.url}/state/{project}"

    def start(self) -> None:
        """Start the server and wait until it is ready: /readyz answers 200 (`serve`, `api`) and
        the controller logged its start (`serve`, `controller`).

        :raise RuntimeError: the server exited or did not become ready in time (log included).
        """
        assert not self.is_running, "already running"
        env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
        env["TOFU_QEMU_USERS"] = f"{USER}:{PASSWORD}"
        env["TOFU_QEMU_LOG_FORMAT"] = "json"
        env |= self.extra_env
        argv = [sys.executable, "-m", "controller.cli", self.command, "--data-dir", str(self.data_dir)]
        if self.command != "controller":
            argv += ["--listen", f"127.0.0.1:{self.port}"]
        argv += self._extra_args
        with self.log_path.open("ab") as log:
            log_offset = log.tell()
            log.write(f"---- start: {' '.join(argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=self._limit_open_files if self._open_files else None,
            )
        self._wait_ready(log_offset)

    def _limit_open_files(self) -> None:
        assert self._open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self._open_files)

    def _wait_ready(self, log_offset: int) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        http_ready = self.command == "controller"
        while time.monotonic() < deadline:
            if not self.is_running:
                raise RuntimeError(f"the server exited during start-up:\n{self.log_text()}")
            if not http_ready:
                with contextlib.suppress(OSError):
                    http_ready = self.request("GET", "/readyz", auth=None, timeout=1.0).status == 200
            if http_ready and (self.command == "api" or self._has_logged(CONTROLLER_STARTED, log_offset)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready within {SERVER_START_TIMEOUT} s:\n{self.log_text()}")

    def _has_logged(self, text: str, offset: int) -> bool:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return text.encode() in log.read()

    def log_since_last_start(self) -> str:
        """The log of the current (or last) incarnation only."""
        text = self.log_text()
        return text[text.rfind("---- start: ") :]

    def kill(self) -> None:
        """SIGKILL the server and reap it; a stopped server is left as it is."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        if process is not None:
            process.wait(timeout=SERVER_STOP_TIMEOUT)

    def stop(self) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL if it does not exit in time.

        Returns the exit code (negative for a signal), or None if it was not started.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        return process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        auth: tuple[str, str] | None = (USER, PASSWORD),
        timeout: float = HTTP_TIMEOUT,
    ) -> HttpAnswer:
        """One HTTP request; any status is an answer, only transport failures raise OSError."""
        return http_request(self._opener, self.url + path, method, body=body, auth=auth, timeout=timeout)

    def get_json(self, path: str) -> Any:
        answer = self.request("GET", path)
        assert answer.status == 200, f"GET {path}: {answer.status} {answer.body[:500]!r}"
        return answer.json()

    def declare_vms(self, project: str, serial: int, vms: Mapping[str, dict[str, Any]]) -> None:
        """POST a state declaring exactly `vms` (name -> spec) in `project`, as Terraform would."""
        answer = self.request("POST", f"/state/{project}", body=encode(vm_state(serial, dict(vms))))
        assert answer.status == 200, answer.body

    def lock(self, project: str, lock_id: str) -> HttpAnswer:
        return self.request("LOCK", f"/state/{project}/lock", body=lock_info(lock_id))

    def unlock(self, project: str, lock_id: str) -> HttpAnswer:
        return self.request("UNLOCK", f"/state/{project}/lock", body=lock_info(lock_id))

    def project(self, project: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json(f"/api/v1/projects/{project}")
        return result

    def vm(self, project: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json(f"/api/v1/projects/{project}/vms/{name}")
        return result


def condition(vm: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition of `type_` in a VM object's status. :raise AssertionError: if absent."""
    matches = [c for c in vm["status"]["conditions"] if c["type"] == type_]
    assert len(matches) == 1, f"expected one {type_} condition in {vm['status']}"
    result: dict[str, Any] = matches[0]
    return result


# ---- Terraform ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TerraformResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"terraform {' '.join(self.args)} exited {self.returncode} after {self.seconds:.1f} s\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def terraform_env(
    *, state_url: str, scratch: Path, user: str = USER, password: str = PASSWORD
) -> dict[str, str]:
    """A scrubbed environment: the http backend via TF_HTTP_*, no network
    (docs/backend.md#configuring-the-client).

    `scratch` holds HOME and the empty CLI config, so no user-level config is ever read.
    """
    home = scratch / "home"
    home.mkdir(parents=True, exist_ok=True)
    cli_config = scratch / "terraformrc"
    cli_config.touch()
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "TF_CLI_CONFIG_FILE": str(cli_config),
        "TF_HTTP_ADDRESS": state_url,
        "TF_HTTP_LOCK_ADDRESS": f"{state_url}/lock",
        "TF_HTTP_UNLOCK_ADDRESS": f"{state_url}/lock",
        "TF_HTTP_USERNAME": user,
        "TF_HTTP_PASSWORD": password,
    }


class Terraform:
    """The terraform CLI in one working dir, with a fixed environment and a deadline per call."""

    def __init__(self, binary: str, workdir: Path, *, env: Mapping[str, str]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.env = dict(env)

    def run(self, *args: str, timeout: float = TERRAFORM_TIMEOUT, check: bool = True) -> TerraformResult:
        """Run `terraform ARGS`; with `check`, a non-zero exit fails the test with the output.

        :raise subprocess.TimeoutExpired: after `timeout` seconds (the process is killed).
        """
        started = time.monotonic()
        completed = subprocess.run(
            [self.binary, *args],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        result = TerraformResult(
            args=args,
            returncode=completed.returncode,
            stdout=_plain(completed.stdout),
            stderr=_plain(completed.stderr),
            seconds=time.monotonic() - started,
        )
        if check:
            assert result.returncode == 0, result.describe()
        return result

    def interactive(self, *args: str) -> InteractiveTerraform:
        """Start `terraform ARGS` with input enabled (TF_INPUT unset), answering on stdin."""
        env = {key: value for key, value in self.env.items() if key != "TF_INPUT"}
        process = subprocess.Popen(
            [self.binary, *args],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return InteractiveTerraform(process)


class InteractiveTerraform:
    """A running terraform command whose output is collected by a reader thread.

    Use it as a context manager: on exit the process is killed if still running, and reaped.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self._chunks: list[bytes] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="terraform-output", daemon=True)
        self._reader.start()

    def __enter__(self) -> InteractiveTerraform:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait(timeout=SERVER_STOP_TIMEOUT)
        self._reader.join(timeout=SERVER_STOP_TIMEOUT)
        if self._process.stdin is not None:
            self._process.stdin.close()

    @property
    def output(self) -> str:
        with self._changed:
            return _plain(b"".join(self._chunks))

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        while chunk := os.read(stdout.fileno(), 65536):
            with self._changed:
                self._chunks.append(chunk)
                self._changed.notify_all()
        stdout.close()
        with self._changed:
            self._changed.notify_all()

    def wait_for_output(self, text: str, *, timeout: float) -> None:
        """Block until `text` appears in the output. :raise AssertionError: exit or timeout first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while text not in _plain(b"".join(self._chunks)):
                remaining = deadline - time.monotonic()
                finished = self._process.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or finished:
                    raise AssertionError(
                        f"{text!r} not seen (exit code {self._process.poll()}); output so far:\n"
                        + _plain(b"".join(self._chunks))
                    )
                self._changed.wait(timeout=min(remaining, 0.2))

    def answer(self, line: str) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def wait(self, *, timeout: float) -> int:
        """Wait for exit and return the exit code. :raise subprocess.TimeoutExpired: too slow."""
        code = self._process.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        return code


def _plain(data: bytes) -> str:
    return _ANSI_RE.sub("", data.decode("utf-8", errors="replace"))


# ---- Configurations ------------------------------------------------------------------------


def copy_example(name: str, destination: Path) -> Path:
    """Copy examples/NAME and the modules it uses under `destination`, keeping their relative
    layout (the example sources "../../tofu/modules/..."); return the example's copy."""
    ignore = shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate*")
    shutil.copytree(REPO_ROOT / "tofu" / "modules", destination / "tofu" / "modules", ignore=ignore)
    workdir = destination / "examples" / name
    shutil.copytree(REPO_ROOT / "examples" / name, workdir, ignore=ignore)
    return workdir


def write_config(destination: Path, hcl: str) -> Path:
    """A root module with an empty http backend block plus `hcl`, in `destination/root`.

    The qemu-vm module is copied beside it, so `source = "../tofu/modules/qemu-vm"` works.
    """
    if not (destination / "tofu").exists():
        shutil.copytree(REPO_ROOT / "tofu" / "modules", destination / "tofu" / "modules")
    workdir = destination / "root"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "main.tf").write_text('terraform {\n  backend "http" {}\n}\n\n' + hcl, encoding="utf-8")
    return workdir


# ---- Waiting -------------------------------------------------------------------------------


# ---- The guest image and QEMU --------------------------------------------------------------

SETUP_TIMEOUT = 600.0  # a cold apt install plus a kernel download; cached, well under a second
QEMU_BINARY_NAME = "qemu-system-x86_64"
QEMU_KILL_TIMEOUT = 10.0
GUEST_HTTP_ATTEMPT_TIMEOUT = 2.0
SERIAL_TAIL_CHARS = 6000


def run_setup_step(script: str, *args: str) -> None:
    """Run hack/SCRIPT; it installs or builds only what is missing. :raise AssertionError: it failed."""
    proc = subprocess.run(
        [str(REPO_ROOT / "hack" / script), *args],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"hack/{script} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def prepare_guest_images(images_dir: Path) -> None:
    """Install QEMU if it is missing and publish the tiny guest to IMAGES/tiny-guest/."""
    run_setup_step("install-qemu")
    run_setup_step("build-guest", "--images-dir", str(images_dir))


def running_identity(pid: int) -> ProcessIdentity:
    """The identity of the running process `pid`. :raise AssertionError: no such process."""
    identity = ProcessIdentity.of(pid)
    assert identity is not None, f"no process {pid}"
    return identity


@dataclass(frozen=True, slots=True)
class LaunchedQemu:
    """A QEMU the controller launched, as its runtime dir's launch.json records it."""

    uid: str
    pid: int
    argv: tuple[str, ...]
    run_dir: Path

    @property
    def is_alive(self) -> bool:
        """Still running (not a zombie) and still the process launch.json describes."""
        return is_running_process(self.pid) and read_cmdline(self.pid) == self.argv


def launched_qemus(data_dir: Path) -> list[LaunchedQemu]:
    """Every launch record under DATA/run/, alive or not."""
    found = []
    for record in sorted((data_dir / "run").glob("*/launch.json")):
        try:
            data = json.loads(record.read_text())
        except (FileNotFoundError, ValueError):
            continue  # being replaced or removed right now
        found.append(LaunchedQemu(record.parent.name, int(data["pid"]), tuple(data["argv"]), record.parent))
    return found


def live_qemu_pids(data_dir: Path) -> set[int]:
    """Running QEMUs of this data dir: those launch.json names, and any other whose command
    line mentions the data dir (one the controller lost track of is still ours to kill)."""
    pids = {qemu.pid for qemu in launched_qemus(data_dir) if qemu.is_alive}
    marker = str(data_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = read_cmdline(int(entry.name))
        if argv and Path(argv[0]).name == QEMU_BINARY_NAME and any(marker in arg for arg in argv):
            pids.add(int(entry.name))
    return {pid for pid in pids if is_running_process(pid)}


def kill_qemus(data_dir: Path) -> set[int]:
    """SIGKILL every running QEMU of this data dir and wait until none runs; return their pids."""
    pids = live_qemu_pids(data_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not any(is_running_process(pid) for pid in pids),
        timeout=QEMU_KILL_TIMEOUT,
        what=f"QEMU pids {sorted(pids)} to die after SIGKILL",
    )
    return pids


def qemu_diagnostics(data_dir: Path) -> list[tuple[str, str]]:
    """(title, text) for every VM runtime dir: serial log tail, QEMU stderr, exit and launch records."""
    sections = []
    for run_dir in sorted((data_dir / "run").glob("*")):
        parts = []
        for name in ("launch.json", "exit.json", "qemu.stderr", "serial.log"):
            path = run_dir / name
            if path.exists():
                text = path.read_text(encoding="utf-8", errors="replace")
                parts.append(f"--- {name}\n{text[-SERIAL_TAIL_CHARS:]}")
        sections.append((f"VM runtime dir {run_dir}", "\n".join(parts) or "(empty)"))
    return sections


def get_guest_page(host_port: int, path: str = "/", *, timeout: float) -> tuple[int, str]:
    """GET through a VM's forwarded port, retrying until a real HTTP answer arrives: a TCP connect
    through SLIRP succeeds even before the guest listens (docs/guest.md#qemu-behaviours-the-code-relies-on).

    :raise AssertionError: no answer within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", host_port, timeout=GUEST_HTTP_ATTEMPT_TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"GET 127.0.0.1:{host_port}{path}: no answer ({err!r})") from err
            time.sleep(0.1)
        finally:
            conn.close()


def vm_or_none(request: Callable[[str, str], HttpAnswer], project: str, name: str) -> dict[str, Any] | None:
    """GET one VM object through `request(method, path)`; None on 404.

    :raise AssertionError: any other status than 200 or 404.
    """
    answer = request("GET", f"/api/v1/projects/{project}/vms/{name}")
    if answer.status == 404:
        return None
    assert answer.status == 200, f"GET VM {project}/{name}: {answer.status} {answer.body[:500]!r}"
    result: dict[str, Any] = answer.json()
    return result


# ---- A data dir with its servers and VMs -----------------------------------------------------

VM_WAIT_TIMEOUT = 60.0


class VmHost:
    """One data dir and the `tofu-qemu` processes that run on it, one per command, all on one
    HTTP port (so Terraform's backend address survives restarts and mode changes).

    The controller gets its own slice of host ports (derived from the HTTP port, outside the
    default range and the kernel's ephemeral range), the shared images dir, and a shared accel
    cache. `close()` kills every server, then every QEMU of the data dir.
    """

    def __init__(self, root: Path, *, images_dir: Path, accel_cache: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.images_dir = images_dir
        self.port = free_loopback_port()
        first = 10_000 + (self.port % 100) * 100
        self.port_range = f"{first}-{first + 99}"
        self._controller_args = (
            "--images-dir", str(images_dir),
            "--accel-cache", str(accel_cache),
            "--port-range", self.port_range,
        )  # fmt: skip
        self.servers: dict[Command, ServerProcess] = {}

    def server(self, command: Command, *, extra_args: Sequence[str] = ()) -> ServerProcess:
        """The (possibly stopped) process for `command`, created on first use with `extra_args`."""
        if command not in self.servers:
            self.servers[command] = ServerProcess(
                data_dir=self.data_dir,
                log_path=self.root / f"{command}.log",
                port=self.port,
                extra_args=(*(() if command == "api" else self._controller_args), *extra_args),
                command=command,
            )
        return self.servers[command]

    def start(self, command: Command = "serve", *, extra_args: Sequence[str] = ()) -> ServerProcess:
        process = self.server(command, extra_args=extra_args)
        process.start()
        return process

    def stop(self, command: Command = "serve") -> int | None:
        """SIGTERM `command` and wait; return its exit code."""
        return self.server(command).stop()

    def close(self) -> None:
        for process in self.servers.values():
            process.kill()
        kill_qemus(self.data_dir)

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILE_NAME

    def state_url(self, project: str) -> str:
        return f"http://127.0.0.1:{self.port}/state/{project}"

    def request(self, method: str, path: str) -> HttpAnswer:
        return http_request(_NO_PROXY, f"http://127.0.0.1:{self.port}{path}", method)

    def vm_or_none(self, project: str, name: str) -> dict[str, Any] | None:
        """The VM object, or None on 404. :raise AssertionError: any other status."""
        return vm_or_none(self.request, project, name)

    def vm(self, project: str, name: str) -> dict[str, Any]:
        found = self.vm_or_none(project, name)
        assert found is not None, f"VM {project}/{name} does not exist"
        return found

    def wait_vm(
        self,
        project: str,
        name: str,
        accept: Callable[[dict[str, Any]], bool],
        *,
        what: str,
        timeout: float = VM_WAIT_TIMEOUT,
    ) -> dict[str, Any]:
        """Poll the VM object until `accept(vm)`; return it. The failure shows the last status."""
        last: list[dict[str, Any] | None] = [None]

        def check() -> dict[str, Any] | None:
            last[0] = self.vm_or_none(project, name)
            return last[0] if last[0] is not None and accept(last[0]) else None

        return wait_until(
            check,
            timeout=timeout,
            what=f"VM {name}: {what}",
            describe=lambda: "last object: " + json.dumps(last[0], indent=1)[-4000:],
        )

    def wait_gone(self, project: str, name: str, *, timeout: float = VM_WAIT_TIMEOUT) -> None:
        """Wait until GET answers 404 (the controller finalized the object)."""
        last: list[dict[str, Any] | None] = [None]

        def check() -> bool:
            last[0] = self.vm_or_none(project, name)
            return last[0] is None

        wait_until(
            check,
            timeout=timeout,
            what=f"VM {name} to be finalized (404)",
            describe=lambda: "last object: " + json.dumps(last[0], indent=1)[-4000:],
        )

    def sql(self, query: str, *params: str | int) -> list[tuple[Any, ...]]:
        """A read-only query of the store (WAL: safe while a server writes)."""
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=HTTP_TIMEOUT)
        try:
            return list(connection.execute(query, params))
        finally:
            connection.close()

    def diagnostics(self) -> list[tuple[str, str]]:
        """(title, text) sections for a failure report: every server log and every VM's files."""
        sections = [(f"tofu-qemu {cmd} log {p.log_path}", p.log_text()) for cmd, p in self.servers.items()]
        return sections + qemu_diagnostics(self.data_dir)


def terraform_for(binary: str, workdir: Path, *, state_url: str, scratch: Path) -> Terraform:
    """Terraform in `workdir`, with its state at `state_url` on a test's own server."""
    return Terraform(binary, workdir, env=terraform_env(state_url=state_url, scratch=scratch))


# ---- Guest VMs declared through Terraform --------------------------------------------------

# Every VM boots the tiny guest on TCG (never KVM here: docs/guest.md#qemu-behaviours-the-code-relies-on),
# has a blank disk (so disk cleanup is observable) and forwards guest port 80 to a host port the
# controller allocates.
# stopTimeout bounds a graceful stop of a guest still booting (its power button is not watched yet).
GUEST_VMS_HCL = """
variable "vms" {
  type = map(object({
    memory = number
    labels = optional(map(string), {})
  }))
}

module "vm" {
  source   = "../tofu/modules/qemu-vm"
  for_each = var.vms

  name         = each.key
  labels       = each.value.labels
  memory       = each.value.memory
  accel        = "tcg"
  kernel       = "tiny-guest/vmlinuz"
  initrd       = "tiny-guest/initramfs.cpio.gz"
  # A vCPU starved by a busy host fails the kernel's IO-APIC timer check and panics.
  cmdline      = "no_timer_check"
  disks        = [{ name = "scratch", size = "8" }]
  forwards     = [{ guest_port = 80 }]
  stop_timeout = 10
}
"""
GUEST_PORT = 80
_KERNEL_MEMORY_RE = re.compile(r"Memory: \d+K/(\d+)K available")
GUEST_BOOT_TIMEOUT = 90.0  # 4-6 s on an idle 2-core host; TCG boots are CPU-bound: allow for a busy one


@dataclass(frozen=True, slots=True)
class GuestVM:
    """One VM's declaration in GUEST_VMS_HCL's `vms` variable."""

    memory: int
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """What the guest's /info.txt says: its name and this boot's id."""

    name: str
    boot_id: str


class Fleet:
    """The VMs of one project on one VmHost, declared by Terraform in its own working dir."""

    def __init__(self, host: VmHost, terraform_bin: str, *, project: str) -> None:
        self.host = host
        self.project = project
        workdir = write_config(host.root / "config", GUEST_VMS_HCL)
        self.terraform = terraform_for(
            terraform_bin, workdir, state_url=host.state_url(project), scratch=host.root / "tf-scratch"
        )
        self.declared: dict[str, GuestVM] = {}

    def init(self) -> None:
        self.terraform.run("init")

    def apply(self, vms: Mapping[str, GuestVM]) -> TerraformResult:
        """Declare exactly `vms` (any other VM of the project is removed) and apply."""
        variables = {
            "vms": {name: {"memory": vm.memory, "labels": dict(vm.labels)} for name, vm in vms.items()}
        }
        (self.terraform.workdir / "terraform.tfvars.json").write_text(json.dumps(variables), encoding="utf-8")
        result = self.terraform.run("apply", "-auto-approve")
        self.declared = dict(vms)
        return result

    def vm(self, name: str) -> dict[str, Any]:
        return self.host.vm(self.project, name)

    def wait_vm(
        self,
        name: str,
        accept: Callable[[dict[str, Any]], bool],
        *,
        what: str,
        timeout: float = VM_WAIT_TIMEOUT,
    ) -> dict[str, Any]:
        return self.host.wait_vm(self.project, name, accept, what=what, timeout=timeout)

    def wait_running(self, name: str, *, timeout: float = VM_WAIT_TIMEOUT) -> dict[str, Any]:
        """Wait until the VM runs its current spec: Running, with a pid, at observedGeneration."""
        return self.wait_vm(name, is_running_current, what="Running at its generation", timeout=timeout)

    def guest_info(self, name: str, *, timeout: float = GUEST_BOOT_TIMEOUT) -> GuestInfo:
        """Read /info.txt through the VM's forwarded port, waiting for the guest to boot."""
        status, body = get_guest_page(host_port(self.vm(name)), "/info.txt", timeout=timeout)
        assert status == 200, f"GET /info.txt from {name}: {status} {body[:300]!r}"
        fields = dict(line.split("=", 1) for line in body.splitlines() if "=" in line)
        return GuestInfo(name=fields["name"], boot_id=fields["boot_id"])

    def guest_memory_kib(self, name: str) -> int:
        """The RAM the guest kernel found at its current boot, from its serial console.

        The guest does not publish its memory over HTTP, but Linux prints
        `Memory: <free>K/<total>K available` early in every boot; QEMU truncates the serial log
        at each start, so after `guest_info` it is this boot's line. <total> is the -m size less
        the firmware's reserved ranges (about 0.5 MiB on q35).
        """
        serial = self.host.data_dir / "run" / self.vm(name)["metadata"]["uid"] / "serial.log"
        found = _KERNEL_MEMORY_RE.findall(serial.read_text(encoding="utf-8", errors="replace"))
        assert len(found) == 1, f"expected one kernel memory line in {serial}: {found}"
        return int(found[0])


def is_running_current(vm: dict[str, Any]) -> bool:
    status = vm["status"]
    return (
        status["phase"] == "Running"
        and status["pid"] is not None
        and status["observedGeneration"] == vm["metadata"]["generation"]
    )


def runs_generation(generation: int) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the VM is at `generation` and runs it (see is_running_current)."""
    return lambda vm: vm["metadata"]["generation"] == generation and is_running_current(vm)


def host_port(vm: dict[str, Any], guest_port: int = GUEST_PORT) -> int:
    """The host port the controller allocated for the VM's forward of `guest_port`."""
    ports = [p["hostPort"] for p in vm["status"]["ports"] if p["guestPort"] == guest_port]
    assert len(ports) == 1, f"expected one forward of guest port {guest_port}: {vm['status']['ports']}"
    return int(ports[0])


def is_about_mib(kib: int, mib: int) -> bool:
    """Whether a guest's memory total in KiB is `mib` MiB less at most 4 MiB of firmware holes."""
    return mib * 1024 - 4096 < kib <= mib * 1024


def memory_argument(pid: int) -> str | None:
    """The value after `-m` in the process's command line (QEMU's memory size, e.g. "192M")."""
    argv = read_cmdline(pid) or ()
    values = [argv[index + 1] for index, arg in enumerate(argv[:-1]) if arg == "-m"]
    return values[0] if len(values) == 1 else None
