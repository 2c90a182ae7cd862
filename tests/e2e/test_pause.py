"""Pause and unpause with real QEMU and the tiny guest, through the `tofu-qemu` client: a paused
guest stops answering HTTP on its forward and its vCPU thread stops using CPU; a controller
restart adopts it still paused; unpause makes it answer again. (A crash restart of a paused VM
coming back running is a table test: tests/unit/test_reconciler_pause.py.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import VmHost, condition, get_guest_page, host_port, is_running_current
from tests.e2e.test_cli import SPEC, Cli

pytestmark = pytest.mark.e2e

PROJECT = "pause"
# Long enough for an idle running guest's vCPU to take CPU ticks (its timer interrupts).
CPU_WINDOW_SECONDS = 3.0
# A paused guest gets this long to answer an HTTP GET, and must not.
SILENCE_SECONDS = 4.0


def thread_ticks(pid: int) -> dict[int, int]:
    """utime + stime (clock ticks) of each thread of `pid`."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        ticks[int(task.name)] = int(fields[11]) + int(fields[12])
    return ticks


def ticks_over(pid: int, seconds: float) -> dict[int, int]:
    """CPU ticks each thread of `pid` took in the next `seconds`."""
    before = thread_ticks(pid)
    time.sleep(seconds)
    return {tid: ticks - before.get(tid, 0) for tid, ticks in thread_ticks(pid).items()}


def is_paused(vm: dict[str, Any]) -> bool:
    return bool(vm["status"]["phase"] == "Paused" and vm["status"]["pid"])


def assert_silent(port: int) -> None:
    with pytest.raises(AssertionError, match="no answer"):
        get_guest_page(port, "/", timeout=SILENCE_SECONDS)


def test_pause_holds_the_guest_across_a_controller_restart_and_unpause_resumes_it(
    make_vm_host: MakeVmHost,
) -> None:
    host: VmHost = make_vm_host()
    server = host.start("serve")
    server.declare_vms(PROJECT, 1, {"web": SPEC})
    vm = host.wait_vm(PROJECT, "web", is_running_current, what="Running")
    port, pid = host_port(vm), vm["status"]["pid"]
    assert get_guest_page(port, "/", timeout=90)[0] == 200
    running = ticks_over(pid, CPU_WINDOW_SECONDS)
    # QEMU's threads all have one name here (no debug-threads): the vCPU is the busy one.
    vcpu = max(running, key=running.__getitem__)
    assert running[vcpu] > 0, "a running guest's vCPU uses CPU"
    cli = Cli(server)

    assert cli.run("pause", "vm", "web").strip() == f"qemuvm/web pause requested (project {PROJECT})"
    paused = host.wait_vm(PROJECT, "web", is_paused, what="Paused")
    assert paused["status"]["pid"] == pid
    ready = condition(paused, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PausedByRequest")
    assert cli.run("get", "vm", "web").splitlines()[1].split()[2:4] == ["Paused", "False"]
    assert_silent(port)
    assert ticks_over(pid, CPU_WINDOW_SECONDS)[vcpu] == 0, "a paused guest's vCPU uses no CPU"

    assert host.stop("serve") == 0
    server = host.start("serve")
    time.sleep(2)  # the restarted controller's first passes have run (the wait below is a poll)
    adopted = host.wait_vm(PROJECT, "web", is_paused, what="still Paused after the restart")
    assert adopted["status"]["pid"] == pid
    assert_silent(port)
    assert ticks_over(pid, CPU_WINDOW_SECONDS)[vcpu] == 0, "the restarted controller did not continue it"

    cli = Cli(server)
    cli.run("unpause", "vm", "web")
    host.wait_vm(PROJECT, "web", is_running_current, what="Running again")
    assert get_guest_page(port, "/", timeout=90)[0] == 200
    events = server.get_json(f"/apis/tofu-qemu.dev/v1alpha1/projects/{PROJECT}/qemuvms/web/events")
    reasons = [event["reason"] for event in events["items"]]
    assert reasons[-4:] == ["PauseRequested", "Paused", "UnpauseRequested", "Unpaused"], reasons


def test_start_strategy_paused_runs_no_guest_code_until_unpause(make_vm_host: MakeVmHost) -> None:
    """QEMU's own `prelaunch` (never continued) is held, not taken for the controller's -S."""
    host: VmHost = make_vm_host()
    server = host.start("serve")
    server.declare_vms(PROJECT, 1, {"web": {**SPEC, "startStrategy": "Paused"}})
    vm = host.wait_vm(PROJECT, "web", is_paused, what="Paused at start")
    assert condition(vm, "Ready")["reason"] == "StartedPaused"
    port, pid = host_port(vm), vm["status"]["pid"]
    assert_silent(port)
    # The main thread (tid = pid) serves QMP and the chardevs, and may take a tick for them; guest
    # code runs only on the other threads (the vCPU's), which must take none.
    ticks = ticks_over(pid, CPU_WINDOW_SECONDS)
    assert len(ticks) > 1, ticks
    assert {tid: n for tid, n in ticks.items() if tid != pid and n} == {}, f"no guest runs: {ticks}"
    Cli(server).run("unpause", "vm", "web")
    host.wait_vm(PROJECT, "web", is_running_current, what="Running after unpause")
    assert get_guest_page(port, "/", timeout=90)[0] == 200
