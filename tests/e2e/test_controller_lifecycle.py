"""The controller runs what Terraform declares: boot, spec changes, crashes, restarts of itself.

One `tofu-qemu serve` and one Terraform working dir serve the whole module (booting guests on
TCG is the slow part), with two VMs, alpha and bravo. Each test first waits for the VMs it uses
to run their current spec, so it does not depend on what an earlier test left. The adoption test
restarts the server and comes last; the kill -9 of an adopted QEMU has its own test
(test_exit_after_restart.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.qemu.process import is_running_process
from tests.e2e.conftest import open_vm_host, report_host_on_failure
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    Fleet,
    GuestVM,
    get_guest_page,
    host_port,
    is_about_mib,
    is_running_current,
    memory_argument,
    running_identity,
    runs_generation,
)

pytestmark = pytest.mark.e2e

PROJECT = "lifecycle"
INITIAL = {"alpha": GuestVM(memory=128), "bravo": GuestVM(memory=128, labels={"tier": "one"})}
RESIZED_MIB = 192


@pytest.fixture(scope="module")
def _module_fleet(
    terraform_bin: str, tmp_path_factory: pytest.TempPathFactory, guest_images: Path, accel_cache: Path
) -> Iterator[Fleet]:
    host = open_vm_host(tmp_path_factory, guest_images, accel_cache)
    try:
        host.start("serve")
        fleet = Fleet(host, terraform_bin, project=PROJECT)
        fleet.init()
        fleet.apply(INITIAL)
        yield fleet
    except BaseException:
        for title, text in host.diagnostics():  # pytest shows this with the setup error
            print(f"==== {title}\n{text[-8000:]}", file=sys.stderr)
        raise
    finally:
        host.close()


@pytest.fixture
def fleet(request: pytest.FixtureRequest, _module_fleet: Fleet) -> Fleet:
    """The module's two VMs; this test's report gets the server log and serial logs if it fails."""
    report_host_on_failure(request, _module_fleet.host)
    return _module_fleet


def test_apply_runs_both_vms_and_each_serves_its_name(fleet: Fleet) -> None:
    """After apply, both VMs are Running and each answers HTTP on its own allocated port with its name."""
    vms = {name: fleet.wait_running(name) for name in INITIAL}

    ports = {name: host_port(vm) for name, vm in vms.items()}
    first, last = map(int, fleet.host.port_range.split("-"))
    assert all(first <= port <= last for port in ports.values()), ports
    assert len(set(ports.values())) == len(ports), ports
    for name, port in ports.items():
        status, body = get_guest_page(port, "/", timeout=GUEST_BOOT_TIMEOUT)
        assert status == 200
        assert f"<h1>{name}</h1>" in body, body


def test_guests_run_at_a_lower_cpu_priority_than_the_controller(fleet: Fleet) -> None:
    """Every QEMU thread, and its session's autogroup, has the default guest nice value (10)."""
    for name in INITIAL:
        pid = fleet.wait_running(name)["status"]["pid"]
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) > 1, "QEMU runs vCPU and I/O threads"
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in tids} == {10}
        autogroup = Path(f"/proc/{pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == "10"


def test_label_change_keeps_the_process_and_acknowledges_the_generation(fleet: Fleet) -> None:
    """A label-only change bumps generation; observedGeneration follows with the same pid and boot."""
    before = fleet.wait_running("bravo")
    boot_before = fleet.guest_info("bravo").boot_id

    relabelled = GuestVM(memory=fleet.declared["bravo"].memory, labels={"tier": "two"})
    fleet.apply({**fleet.declared, "bravo": relabelled})

    generation = before["metadata"]["generation"] + 1
    after = fleet.wait_vm("bravo", runs_generation(generation), what=f"observedGeneration {generation}")
    assert after["metadata"]["labels"] == {"tier": "two"}
    assert after["status"]["pid"] == before["status"]["pid"]
    assert after["status"]["restarts"] == before["status"]["restarts"]
    assert fleet.guest_info("bravo").boot_id == boot_before


def test_memory_change_restarts_only_that_vm_with_the_new_size(fleet: Fleet) -> None:
    """A memory change reboots alpha with `-m 192M`, which its kernel sees; bravo keeps its pid and boot."""
    alpha, bravo = fleet.wait_running("alpha"), fleet.wait_running("bravo")
    alpha_process = running_identity(alpha["status"]["pid"])
    # Both guests booted, so alpha's power button is watched and the graceful stop is quick.
    alpha_boot, bravo_boot = fleet.guest_info("alpha").boot_id, fleet.guest_info("bravo").boot_id
    assert memory_argument(alpha["status"]["pid"]) == "128M"
    assert is_about_mib(fleet.guest_memory_kib("alpha"), 128)

    fleet.apply({**fleet.declared, "alpha": GuestVM(memory=RESIZED_MIB)})

    generation = alpha["metadata"]["generation"] + 1
    resized = fleet.wait_vm(
        "alpha",
        lambda vm: (
            vm["metadata"]["generation"] == generation
            and is_running_current(vm)
            and vm["status"]["pid"] != alpha["status"]["pid"]
        ),
        what=f"Running with a new pid at generation {generation}",
    )
    assert resized["spec"]["memory"] == RESIZED_MIB
    assert memory_argument(resized["status"]["pid"]) == f"{RESIZED_MIB}M"
    assert not alpha_process.is_running
    assert fleet.guest_info("alpha").boot_id != alpha_boot
    assert is_about_mib(fleet.guest_memory_kib("alpha"), RESIZED_MIB), fleet.guest_memory_kib("alpha")
    assert fleet.vm("bravo")["status"]["pid"] == bravo["status"]["pid"]
    assert fleet.guest_info("bravo").boot_id == bravo_boot


def test_spec_restart_is_recorded_as_a_controller_stop_not_a_crash(fleet: Fleet) -> None:
    """After a restart for a spec change, lastExit is stopped-by-controller and restarts is unchanged."""
    before = fleet.wait_running("alpha")
    fleet.guest_info("alpha")  # booted: the power button is watched
    memory = RESIZED_MIB if fleet.declared["alpha"].memory != RESIZED_MIB else RESIZED_MIB - 32

    fleet.apply({**fleet.declared, "alpha": GuestVM(memory=memory)})

    generation = before["metadata"]["generation"] + 1
    after = fleet.wait_vm(
        "alpha",
        lambda vm: runs_generation(generation)(vm) and vm["status"]["pid"] != before["status"]["pid"],
        what=f"Running with a new pid at generation {generation}",
    )
    assert after["status"]["lastExit"]["reason"] == "stopped-by-controller", json.dumps(after["status"])
    assert after["status"]["restarts"] == before["status"]["restarts"], json.dumps(after["status"])
    assert after["status"]["failures"] == 0, json.dumps(after["status"])


def test_kill_9_restarts_the_vm_and_records_the_signal(fleet: Fleet) -> None:
    """After kill -9 of bravo's QEMU it is Running again with a new pid, restarts + 1, lastExit signal 9."""
    before = fleet.wait_running("bravo")
    old_pid = before["status"]["pid"]
    old_process = running_identity(old_pid)

    os.kill(old_pid, signal.SIGKILL)

    after = fleet.wait_vm(
        "bravo",
        lambda vm: is_running_current(vm) and vm["status"]["pid"] != old_pid,
        what="Running again with a new pid",
    )
    assert after["status"]["restarts"] == before["status"]["restarts"] + 1, json.dumps(after["status"])
    last_exit = after["status"]["lastExit"]
    assert (last_exit["reason"], last_exit["signal"]) == ("killed-by-signal", 9), json.dumps(after["status"])
    assert not old_process.is_running
    assert is_running_process(after["status"]["pid"])


def test_restarted_server_adopts_running_vms(fleet: Fleet) -> None:
    """SIGTERM the server, start it again: it reconciles the same QEMU pids, restarts unchanged."""
    before = {name: fleet.wait_running(name) for name in INITIAL}
    pids = {name: vm["status"]["pid"] for name, vm in before.items()}
    processes = [running_identity(pid) for pid in pids.values()]

    assert fleet.host.stop("serve") == 0, "the server did not drain and exit cleanly on SIGTERM"
    assert all(process.is_running for process in processes), "stopping the server stopped a VM"
    server = fleet.host.start("serve")
    # A label change proves the new controller reconciled both VMs: observedGeneration moves only
    # when it observes the VM running the current spec.
    fleet.apply({name: GuestVM(vm.memory, labels={"adopted": "yes"}) for name, vm in fleet.declared.items()})

    for name, vm in before.items():
        generation = vm["metadata"]["generation"] + 1
        after = fleet.wait_vm(
            name, runs_generation(generation), what=f"observedGeneration {generation} after the restart"
        )
        assert after["status"]["pid"] == pids[name]
        assert after["status"]["restarts"] == vm["status"]["restarts"]
    assert '"vm_spawned"' not in server.log_since_last_start()
    assert all(process.is_running for process in processes), "the same processes, not new ones"
