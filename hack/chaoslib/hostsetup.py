"""Several hosts for the host faults (--host-faults): a private PostgreSQL cluster, one
`tofu-qemu api` and --hosts `tofu-qemu controller` processes, each with its own data dir, port
range and host name, in the tool's workspace. Everything is killed at the end (the workspace
then kills the QEMUs of its data dirs)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import free_port, install_guest
from _procfs import kill_qemus
from _workspace import Workspace

from chaoslib.api import Api
from chaoslib.basics import PROCESS_EXIT_TIMEOUT_S, SPAWN_USER, START_TIMEOUT_S, ChaosError, note
from chaoslib.checks import wait_until
from chaoslib.processes import Controller, Launch, start_process
from tests.postgres import PostgresCluster

# Short, so a fault shows within seconds: NotReady one lease after the last renewal, HostLost
# (and, where the build reschedules, a move) the grace after that. Defaults: 15 s and 30 s.
HOST_LEASE_S = 6.0
HOST_LOST_GRACE_S = 6.0
PORTS_PER_HOST = 100


@dataclass(slots=True)
class Host:
    """One controller: its name, data dir and process."""

    name: str
    data_dir: Path
    controller: Controller
    frozen: bool = False

    @property
    def pid(self) -> int | None:
        return self.controller.pid


@dataclass(slots=True)
class Cluster:
    """The store, the api and the hosts of one run."""

    postgres: PostgresCluster
    url: str
    api: Api
    hosts: dict[str, Host] = field(default_factory=dict)

    def host_rows(self) -> dict[str, dict[str, Any]]:
        """GET /api/v1/hosts by name; empty while the store is down."""
        try:
            status, body = self.api.request("GET", "/api/v1/hosts")
        except OSError:
            return {}
        if status != 200:
            return {}
        return {row["name"]: row for row in json.loads(body)["items"]}

    def api_ready(self) -> bool:
        try:
            return self.api.request("GET", "/readyz")[0] == 200
        except OSError:
            return False


@contextlib.contextmanager
def spawned_hosts(args: argparse.Namespace, workspace: Workspace) -> Iterator[Cluster]:
    images_dir = args.images_dir or workspace.images_dir
    if not (images_dir / "tiny-guest" / "vmlinuz").is_file():
        install_guest(images_dir)
    postgres = PostgresCluster()
    api_process: subprocess.Popen[bytes] | None = None
    cluster: Cluster | None = None
    try:
        postgres.start()
        url = postgres.create_database()
        password = secrets.token_hex(16)
        env = {key: value for key, value in os.environ.items() if not key.startswith("TOFU_QEMU_")}
        env |= {
            "TOFU_QEMU_USERS": f"{SPAWN_USER}:{password}",
            "TOFU_QEMU_LOG_FORMAT": "json",
            "TOFU_QEMU_DATABASE_URL": url,
        }
        port = free_port()
        base = (sys.executable, "-m", "controller.cli")
        api_data = workspace.root / "api-data"
        api_launch = Launch(
            (*base, "api", "--data-dir", str(api_data), "--listen", f"127.0.0.1:{port}"),
            env,
            workspace.root / "api.log",
        )
        authorization = "Basic " + base64.b64encode(f"{SPAWN_USER}:{password}".encode()).decode()
        cluster = Cluster(postgres, url, Api(f"http://127.0.0.1:{port}", authorization=authorization))
        api_process = start_process(api_launch, marker="api start")
        wait_until(cluster.api_ready, timeout=START_TIMEOUT_S, what="`tofu-qemu api`")
        first_port = int(args.port_range.split("-")[0])
        for index in range(args.hosts):
            name = f"host-{chr(ord('a') + index)}"
            low = first_port + index * PORTS_PER_HOST
            cluster.hosts[name] = start_host(
                name, workspace, env, images_dir, port_range=f"{low}-{low + PORTS_PER_HOST - 1}"
            )
        wait_until(
            lambda: (
                all(row["ready"] for row in cluster.host_rows().values())
                and len(cluster.host_rows()) == args.hosts
            ),
            timeout=START_TIMEOUT_S,
            what=f"{args.hosts} hosts Ready",
        )
        hosts = ", ".join(sorted(cluster.hosts))
        note(f"PostgreSQL on 127.0.0.1:{postgres.port}, api on {cluster.api.base_url}, hosts {hosts}")
        yield cluster
    finally:
        if cluster is not None:
            for host in cluster.hosts.values():
                with contextlib.suppress(ProcessLookupError):
                    if host.pid is not None:
                        os.kill(host.pid, signal.SIGCONT)  # a frozen controller must be able to die
                host.controller.stop()
                kill_qemus(host.data_dir)
        if api_process is not None and api_process.poll() is None:
            api_process.kill()
            api_process.wait(PROCESS_EXIT_TIMEOUT_S)
        postgres.remove()


def start_host(
    name: str, workspace: Workspace, env: dict[str, str], images_dir: Path, *, port_range: str
) -> Host:
    data_dir = workspace.root / f"data-{name}"
    log_path = workspace.root / f"controller-{name}.log"
    launch = Launch(
        (
            sys.executable, "-m", "controller.cli", "controller",
            "--data-dir", str(data_dir),
            "--images-dir", str(images_dir),
            "--port-range", port_range,
            "--host-name", name,
            "--host-lease-seconds", str(HOST_LEASE_S),
            "--host-lost-grace-seconds", str(HOST_LOST_GRACE_S),
            "--ops-listen", f"127.0.0.1:{free_port()}",
            "--accel-cache", str(workspace.root / "accel.json"),
        ),
        env,
        log_path,
    )  # fmt: skip
    child = start_process(launch, marker=f"controller {name} start")
    controller = Controller(pid=child.pid, child=child, launch=launch)

    def started() -> bool:
        if child.poll() is not None:
            raise ChaosError(f"the controller of {name} exited with {child.returncode} (log {log_path})")
        return '"controller_started"' in log_path.read_text(errors="replace")

    wait_until(started, timeout=START_TIMEOUT_S, what=f"the controller of {name}")
    return Host(name, data_dir, controller)
