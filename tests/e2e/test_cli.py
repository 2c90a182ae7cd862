"""The kubectl-like client against a real server running real VMs: tables, documents, describe,
logs, restart/stop/start, locks and force-unlock, watch, and exit statuses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    PASSWORD,
    REPO_ROOT,
    USER,
    ServerProcess,
    VmHost,
    get_guest_page,
    host_port,
    is_running_current,
)

pytestmark = pytest.mark.e2e

PROJECT = "cli"
CLI_TIMEOUT = 60.0
SPEC: dict[str, Any] = {
    "memory": 128,
    "accel": "tcg",
    "stopTimeout": 10,
    "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
    "network": {"forwards": [{"guestPort": 80}]},
}


class Cli:
    """`tofu-qemu` client commands run as a user would, configured by the environment."""

    def __init__(self, server: ServerProcess, **overrides: str) -> None:
        self.env = {
            **os.environ,
            "TOFU_QEMU_SERVER": f"http://127.0.0.1:{server.port}",
            "TOFU_QEMU_USERNAME": USER,
            "TOFU_QEMU_PASSWORD": PASSWORD,
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
            **overrides,
        }
        self.server = server

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "controller.cli", *args]

    def run(self, *args: str, status: int = 0) -> str:
        result = subprocess.run(
            self.argv(*args), cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=CLI_TIMEOUT
        )
        assert result.returncode == status, (
            f"tofu-qemu {' '.join(args)}: {result.returncode}\n{result.stderr}"
        )
        return result.stdout if status == 0 else result.stderr


def json_documents(text: str) -> list[Any]:
    """The JSON documents printed one after another (as `get -w -o json` does)."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        document, at = decoder.raw_decode(text, at)
        documents.append(document)
    return documents


@pytest.fixture
def running(make_vm_host: MakeVmHost) -> tuple[VmHost, Cli]:
    host = make_vm_host()
    server = host.start("serve")
    server.declare_vms(PROJECT, 1, {"web": SPEC, "db": SPEC})
    for name in ("web", "db"):
        vm = host.wait_vm(PROJECT, name, is_running_current, what=f"{name} Running")
        get_guest_page(host_port(vm), "/", timeout=90)
    return host, Cli(server)


def test_get_describe_and_logs(running: tuple[VmHost, Cli]) -> None:
    host, cli = running
    table = cli.run("get", "vms").splitlines()
    assert table[0].split() == ["NAME", "PROJECT", "PHASE", "READY", "ACCEL", "PORTS", "RESTARTS", "AGE"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["web"][1:5] == [PROJECT, "Running", "True", "tcg"]
    assert rows["web"][5] == f"{host_port(host.vm(PROJECT, 'web'))}->80/tcp"

    assert cli.run("get", "vms", "-o", "name").splitlines() == ["qemuvm/db", "qemuvm/web"]
    listing = json.loads(cli.run("get", "vms", "-o", "json"))
    assert listing["kind"] == "QemuVMList"
    assert sorted(vm["metadata"]["name"] for vm in listing["items"]) == ["db", "web"]
    one = yaml.safe_load(cli.run("get", "vm", "web", "-o", "yaml"))
    assert (one["kind"], one["metadata"]["namespace"], one["status"]["phase"]) == (
        "QemuVM",
        PROJECT,
        "Running",
    )
    assert "PID" in cli.run("get", "vms", "-o", "wide").splitlines()[0]

    described = cli.run("describe", "vm", "web")
    assert "Name:         web" in described
    assert "Phase:        Running" in described
    assert re.search(r"^  Ready +True +Running ", described, re.MULTILINE), described
    assert "Started" in described.split("Events:")[1], "recent events are listed"

    assert "TOFU-GUEST-READY" in cli.run("logs", "vm", "web", "-p", PROJECT)


def test_restart_stop_start_and_watch(running: tuple[VmHost, Cli]) -> None:
    host, cli = running
    watcher = subprocess.Popen(
        cli.argv("get", "vms", "-w", "-o", "json"),
        cwd=REPO_ROOT,
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = host.vm(PROJECT, "web")["status"]["pid"]
        assert cli.run("restart", "vm", "web").strip() == f"qemuvm/web restart requested (project {PROJECT})"
        restarted = host.wait_vm(
            PROJECT,
            "web",
            lambda vm: (
                is_running_current(vm) and vm["status"]["pid"] != pid and vm["status"]["restarts"] == 1
            ),
            what="restarted, counted",
        )
        assert restarted["spec"] == host.vm(PROJECT, "db")["spec"], "the spec is untouched"

        cli.run("stop", "vm", "db")
        stopped = host.wait_vm(PROJECT, "db", lambda vm: vm["status"]["phase"] == "Stopped", what="stopped")
        assert stopped["status"]["override"]["stopped"] is True
        time.sleep(1)  # still stopped: nothing restarts it behind the user's back
        assert host.vm(PROJECT, "db")["status"]["phase"] == "Stopped"
        cli.run("start", "vm", "db")
        host.wait_vm(PROJECT, "db", is_running_current, what="started again")
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=10)
    events = json_documents(output)
    # A watch may merge quick successive changes of one object: only lasting states are sure.
    seen = {
        (
            event["object"]["metadata"]["name"],
            event["object"]["status"]["phase"],
            event["object"]["status"]["restarts"],
        )
        for event in events
    }
    assert {("web", "Running", 1), ("db", "Stopped", 0), ("db", "Running", 0)} <= seen


def test_locks_and_force_unlock(running: tuple[VmHost, Cli]) -> None:
    host, cli = running
    server = host.servers["serve"]
    assert server.lock(PROJECT, "lock-1").status == 200
    table = cli.run("locks").splitlines()
    assert table[0].split() == ["PROJECT", "ID", "WHO", "OPERATION", "AGE"]
    assert table[1].split()[:2] == [PROJECT, "lock-1"]
    refused = cli.run("force-unlock", PROJECT, "--id", "other", status=1)
    assert (
        "409 Conflict: project 'cli' is locked by ID 'lock-1', not 'other'; nothing was unlocked" in refused
    )
    assert cli.run("force-unlock", PROJECT, "--id", "lock-1").strip() == f"project {PROJECT}: lock released"
    assert server.lock(PROJECT, "lock-2").status == 200, "the lock was really released"
    versions = cli.run("states", PROJECT).splitlines()
    assert versions[0].split()[:2] == ["SERIAL", "LINEAGE"]


def test_exit_statuses(running: tuple[VmHost, Cli]) -> None:
    _, cli = running
    assert "no VM named 'nope'" in cli.run("describe", "vm", "nope", status=1)
    assert "404" in cli.run("get", "vm", "nope", "-p", PROJECT, status=1)
    assert "invalid choice" in cli.run("get", "pods", status=2)
    assert "401" in Cli(cli.server, TOFU_QEMU_PASSWORD="wrong").run("get", "vms", status=1)
    unreachable = Cli(cli.server, TOFU_QEMU_SERVER="http://127.0.0.1:9")
    assert "cannot reach http://127.0.0.1:9" in unreachable.run("get", "vms", status=1)
