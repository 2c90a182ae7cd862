"""Targets: a spawned `tofu-qemu api` + `tofu-qemu controller` (--spawn), or a running host (--server)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from _common import (
    free_port,
    install_guest,
)
from _workspace import Workspace

from api.store.db import DB_FILE_NAME
from chaoslib.api import Api, authorization_from_env
from chaoslib.basics import PROCESS_EXIT_TIMEOUT_S, SPAWN_USER, START_TIMEOUT_S, ChaosError, UsageError, note
from chaoslib.checks import wait_until
from chaoslib.faults import Target
from chaoslib.processes import Controller, Launch, start_process
from controller.qemu.process import is_running_process


@contextlib.contextmanager
def spawned_target(args: argparse.Namespace, workspace: Workspace) -> Iterator[Target]:
    """`tofu-qemu api` and `tofu-qemu controller` on the workspace's data dir; both killed on exit
    (the workspace then kills the QEMUs)."""
    images_dir = args.images_dir or workspace.images_dir
    if not (images_dir / "tiny-guest" / "vmlinuz").is_file():
        install_guest(images_dir)
    password = secrets.token_hex(16)
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
    env |= {"TOFU_QEMU_USERS": f"{SPAWN_USER}:{password}", "TOFU_QEMU_LOG_FORMAT": "json"}
    base = [sys.executable, "-m", "controller.cli"]
    data = ["--data-dir", str(workspace.data_dir)]
    port = free_port()
    api_launch = Launch(
        (*base, "api", *data, "--listen", f"127.0.0.1:{port}"), env, workspace.root / "api.log"
    )
    controller_argv = (
        *base, "controller", *data,
        "--images-dir", str(images_dir),
        "--port-range", args.port_range,
        "--ops-listen", f"127.0.0.1:{free_port()}",
        "--accel-cache", str(workspace.root / "accel.json"),
    )  # fmt: skip
    controller_launch = Launch(controller_argv, env, workspace.root / "controller.log")
    authorization = "Basic " + base64.b64encode(f"{SPAWN_USER}:{password}".encode()).decode()
    api = Api(f"http://127.0.0.1:{port}", authorization=authorization)
    api_process = start_process(api_launch, marker="api start")
    controller: Controller | None = None
    try:
        wait_until(lambda: _is_ready(api, api_process), timeout=START_TIMEOUT_S, what="`tofu-qemu api`")
        child = start_process(controller_launch, marker="controller start")
        controller = Controller(pid=child.pid, child=child, launch=controller_launch)
        wait_until(
            lambda: _has_started(controller_launch.log_path, child),
            timeout=START_TIMEOUT_S,
            what="`tofu-qemu controller`",
        )
        note(f"api pid {api_process.pid} on {api.base_url}, controller pid {child.pid}; in {workspace.root}")
        yield Target(api, args.project, workspace.data_dir, controller, controller_launch.log_path)
    finally:
        if controller is not None:
            controller.stop()
        if api_process.poll() is None:
            api_process.kill()
        api_process.wait(PROCESS_EXIT_TIMEOUT_S)


def _is_ready(api: Api, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise ChaosError(f"`tofu-qemu api` exited with {process.returncode}")
    try:
        return api.request("GET", "/readyz")[0] == 200
    except OSError:
        return False


def _has_started(log_path: Path, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise ChaosError(f"`tofu-qemu controller` exited with {process.returncode} (log {log_path})")
    return '"controller_started"' in log_path.read_text(errors="replace")


def server_target(args: argparse.Namespace) -> Target:
    """A running host named by --server and --data-dir."""
    data_dir = args.data_dir.resolve()
    if not (data_dir / DB_FILE_NAME).is_file():
        raise UsageError(f"{data_dir} holds no {DB_FILE_NAME}: --data-dir must be the server's data dir")
    controller, log_path = None, args.controller_log
    if args.controller_pid is not None:
        if not is_running_process(args.controller_pid):
            raise UsageError(f"--controller-pid {args.controller_pid} is not a running process")
        launch = None
        if args.controller_cmd:
            # Restarts log where --controller-log says, so their times are read back from it.
            log_path = (args.controller_log or Path("chaos-controller.log")).resolve()
            argv = tuple(shlex.split(args.controller_cmd))
            launch = Launch(argv, dict(os.environ), log_path, cwd=Path.cwd())
        controller = Controller(pid=args.controller_pid, child=None, launch=launch)
    api = Api(args.server, authorization=authorization_from_env())
    return Target(api, args.project, data_dir, controller, log_path)
