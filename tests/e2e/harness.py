"""Real processes for the e2e tests: the `tofu-qemu serve` server and the Terraform CLI.

Invariants: every process started here has an owner that kills it (the fixtures in conftest.py),
every wait has a deadline, and nothing is written into the repository tree: configurations are
copied into pytest's tmp dirs. Terraform runs with a scrubbed environment (no inherited `TF_*`,
an empty CLI config, no checkpoint calls), so it never tries the network.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

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


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def lock_info(lock_id: str, *, operation: str = "OperationTypeApply") -> bytes:
    """A lock body shaped like Terraform 1.11's (PROTOCOL.md §4.3)."""
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


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One `tofu-qemu serve` subprocess on a loopback port, logging to a file.

    Restarting on the same data dir appends to the same log, so a failure report shows every
    incarnation.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        log_path: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        """`extra_args` go to `serve`; `client_tls` makes requests use HTTPS with that context."""
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_loopback_port()
        self._extra_args = tuple(extra_args)
        self._opener = (
            urllib.request.build_opener(
                urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=client_tls)
            )
            if client_tls
            else _NO_PROXY
        )
        self._scheme = "https" if client_tls else "http"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILE_NAME

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def state_url(self, project: str) -> str:
        return f"{self.url}/state/{project}"

    def start(self) -> None:
        """Start the server and wait until /readyz answers 200.

        :raise RuntimeError: the server exited or did not become ready in time (log included).
        """
        assert not self.is_running, "already running"
        env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
        env["TOFU_QEMU_USERS"] = f"{USER}:{PASSWORD}"
        env["TOFU_QEMU_LOG_FORMAT"] = "json"
        argv = [sys.executable, "-m", "controller.cli", "serve"]
        argv += ["--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}", *self._extra_args]
        with self.log_path.open("ab") as log:
            log.write(f"---- start: {' '.join(argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.is_running:
                raise RuntimeError(f"the server exited during start-up:\n{self.log_text()}")
            try:
                if self.request("GET", "/readyz", auth=None, timeout=1.0).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server was not ready within {SERVER_START_TIMEOUT} s:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL the server and reap it; a stopped server is left as it is."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        if process is not None:
            process.wait(timeout=SERVER_STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (a graceful drain), then SIGKILL if it does not exit in time."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

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
        headers = {"Authorization": basic_auth(*auth)} if auth else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        # Always http://127.0.0.1:PORT built above, never a caller's URL.
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)  # noqa: S310
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return HttpAnswer(response.status, response.read())
        except urllib.error.HTTPError as err:
            with err:
                return HttpAnswer(err.code, err.read())

    def get_json(self, path: str) -> Any:
        answer = self.request("GET", path)
        assert answer.status == 200, f"GET {path}: {answer.status} {answer.body[:500]!r}"
        return answer.json()

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
    """A scrubbed environment: the http backend via TF_HTTP_* (PROTOCOL.md §2), no network.

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
