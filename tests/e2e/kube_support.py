"""The real kubectl against a tofu-qemu server over TLS, through a kubeconfig that
`tofu-qemu kubeconfig` wrote (docs/kubectl.md)."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.e2e.harness import REPO_ROOT, ServerProcess
from tests.e2e.tls_support import Pki, client_context

KUBECTL_TIMEOUT = 60.0
TOKEN = "kubectl-test-token"


def kubectl_binary() -> str:
    """The machine's kubectl; never downloaded (the test skips loudly without it)."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("SKIPPED LOUDLY: kubectl is not installed; install it from the distribution's packages")
    return found


def tls_server(pki: Pki, root: Path, *extra: str) -> ServerProcess:
    """`tofu-qemu api` over TLS with a bearer token (and the test's Basic user for setup)."""
    server = ServerProcess(
        data_dir=root / "data",
        log_path=root / "server.log",
        command="api",
        extra_args=["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), *extra],
        client_tls=client_context(pki, with_certificate="--tls-client-ca" in extra),
    )
    server.extra_env["TOFU_QEMU_TOKENS"] = TOKEN
    return server


def write_kubeconfig(
    server: ServerProcess, pki: Pki, path: Path, *args: str, token: str | None = TOKEN
) -> Path:
    """Run `tofu-qemu kubeconfig` as a user would and keep what it prints."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
    if token is not None:
        env["TOFU_QEMU_TOKEN"] = token
    argv = [sys.executable, "-m", "controller.cli", "kubeconfig", "--listen", f"127.0.0.1:{server.port}",
            "--tls-cert", str(pki.server_cert), "--ca-file", str(pki.ca_cert), *args]  # fmt: skip
    made = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT, check=False
    )
    assert made.returncode == 0, made.stderr
    path.write_text(made.stdout)
    path.chmod(0o600)
    return path


class Kubectl:
    """kubectl with one kubeconfig, a private HOME (its discovery cache) and no proxy."""

    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.binary = kubectl_binary()
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "KUBECONFIG": str(kubeconfig),
        }

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check:
            assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.returncode}\n{done.stderr}"
        return done

    def out(self, *args: str) -> str:
        return self.run(*args).stdout

    def stream(self, *args: str) -> LineStream:
        return LineStream([self.binary, *args], self.env)


class LineStream:
    """A long-running kubectl (get -w) whose output lines are read with deadlines."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self._process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, *, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"kubectl printed no line with {text!r} within {timeout:.0f} s: {self.seen}")

    def close(self) -> None:
        self._process.kill()
        self._process.wait(timeout=KUBECTL_TIMEOUT)
