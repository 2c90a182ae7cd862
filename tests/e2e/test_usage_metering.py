"""Usage metering with real QEMU (TCG) and the tiny guest made to busy-loop.

The guest spins from its first instruction after the kernel: `rdinit=/bin/sh -- -c "while :; do
:; done"` runs a shell loop as PID 1 of the initramfs. With `-smp 1` on TCG that is one host
thread that always wants a CPU, so the CPU time it could get is known: the wall time minus the
time it waited for a CPU on the run queue (the kernel's schedstat). On an idle host that is the
wall time; on this shared 2-core machine other jobs take some of it, and the test says how much.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from api.store import StateStore, VMStore, open_store
from api.store.usage import UsageStore
from api.testing.tfstate import vm_state
from api.testing.waiting import wait_until
from api.usage import Usage
from controller.usage_sampler import TICKS_PER_SECOND, UsageMetrics, UsageSampler
from tests.component.test_store_states import write
from tests.component.test_usage_store import add_disk
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import VmHost, is_running_current, terraform_for, write_config
from tests.e2e.test_guest_boot import QMP_TIMEOUT, GuestImage, Qmp, guest_image

pytestmark = pytest.mark.e2e
__all__ = ["guest_image"]  # a fixture used here

SPIN = 'rdinit=/bin/sh -- -c "echo TOFU-SPIN; while :; do :; done"'
SPIN_MARKER = b"TOFU-SPIN"
# At least this much CPU in the busy window, so that 10 % is 60 clock ticks, not noise.
BUSY_CPU_SECONDS = 6.0
BUSY_DEADLINE_SECONDS = 180.0
SAMPLE_SECONDS = 3.0
PAUSED_SECONDS = 8.0
TOLERANCE = 0.10  # the issue's: within 10 %
# A paused QEMU runs no guest code; its main loop sleeps. Two clock ticks of slack.
PAUSED_CPU_MAX = 2 / TICKS_PER_SECOND
RETENTION = timedelta(days=400)


def spin_argv(image: GuestImage, workdir: Path, disk: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    return [
        qemu, "-nodefaults", "-no-user-config", "-accel", "tcg", "-machine", "q35", "-smp", "1",
        "-m", "128", "-display", "none", "-no-reboot",
        "-serial", f"file:{workdir / 'serial.log'}",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-drive", f"file={disk},if=virtio,format=qcow2",
        "-kernel", str(image.vmlinuz), "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 panic=-1 {SPIN}",
    ]  # fmt: skip


@pytest.fixture
def spinning_qemu(
    guest_image: GuestImage, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Qmp, Path]]:
    disk = tmp_path / "disk.qcow2"
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True, timeout=30)
    with (tmp_path / "qemu.stderr").open("wb") as stderr:
        process = subprocess.Popen(
            spin_argv(guest_image, tmp_path, disk), stdin=subprocess.DEVNULL, stderr=stderr
        )
    try:
        qmp = Qmp.connect(tmp_path / "qmp.sock", timeout=QMP_TIMEOUT, is_alive=lambda: process.poll() is None)
        wait_until(
            lambda: SPIN_MARKER in (tmp_path / "serial.log").read_bytes(),
            timeout=90,
            what="the guest's busy loop to start",
        )
        yield process, qmp, disk
        qmp.close()
    finally:
        process.kill()
        process.wait(timeout=10)


def schedstat(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting on the run queue): of thread `tid`, else summed over
    every thread of `pid`. The scheduler's own accounting, in nanoseconds."""
    paths = (
        [Path(f"/proc/{pid}/task/{tid}/schedstat")]
        if tid
        else list(Path(f"/proc/{pid}/task").glob("*/schedstat"))
    )
    ran = waited = 0
    for path in paths:
        on_cpu, on_queue, _ = path.read_text().split()
        ran, waited = ran + int(on_cpu), waited + int(on_queue)
    return ran / 1e9, waited / 1e9


async def metered(database: Path, uid: str) -> Usage:
    db = await open_store(database, database_url=None)
    try:
        now = datetime.now(UTC)
        hours = await UsageStore(db).hours("lab", now - timedelta(hours=2), now + timedelta(hours=1))
    finally:
        await db.close()
    return sum((hour.usage for hour in hours if hour.uid == uid), Usage())


async def sample_now(database: Path, pid: int, uid: str) -> None:
    """One sampler round on a freshly opened store, as a restarted controller's first would be."""
    db = await open_store(database, database_url=None)
    try:
        sampler = UsageSampler(
            UsageStore(db),
            lambda: {uid: pid},
            UsageMetrics(CollectorRegistry()),
            period=1,
            retention=RETENTION,
            minutes_retention=timedelta(hours=48),
        )
        await sampler.sample_once()
    finally:
        await db.close()


async def test_a_busy_guest_is_metered_within_ten_percent_and_a_paused_one_accrues_nothing(
    spinning_qemu: tuple[subprocess.Popen[bytes], Qmp, Path], tmp_path: Path
) -> None:
    process, qmp, disk = spinning_qemu
    database = tmp_path / "store"
    db = await open_store(database, database_url=None)
    await write(StateStore(db, history_limit=3), vm_state(1, {"spin": {}}))
    (record,) = await VMStore(db).list_records(project="lab")
    await add_disk(db, record.uid, disk)
    await db.close()
    (vcpu,) = qmp.execute("query-cpus-fast")
    tid = int(vcpu["thread-id"])

    await sample_now(database, process.pid, record.uid)
    before, wall_before = await metered(database, record.uid), time.monotonic()
    ran_before, (_, waited_before) = schedstat(process.pid)[0], schedstat(process.pid, tid)
    # Several deltas, each by a "restarted controller", until the guest has had BUSY_CPU_SECONDS
    # of CPU: on a loaded host that takes longer than BUSY_CPU_SECONDS of wall time.
    deadline = time.monotonic() + BUSY_DEADLINE_SECONDS
    rounds = 0
    while rounds < 3 or schedstat(process.pid)[0] - ran_before < BUSY_CPU_SECONDS:
        assert time.monotonic() < deadline, (
            f"the guest got {schedstat(process.pid)[0] - ran_before:.2f} s of CPU"
        )
        await asyncio.sleep(SAMPLE_SECONDS)
        await sample_now(database, process.pid, record.uid)
        rounds += 1
    busy = (await metered(database, record.uid)).cpu_seconds - before.cpu_seconds
    wall = time.monotonic() - wall_before
    ran = schedstat(process.pid)[0] - ran_before
    could_run = wall - (schedstat(process.pid, tid)[1] - waited_before)
    figures = f"metered {busy:.2f} s, kernel {ran:.2f} s, could run {could_run:.2f} s of {wall:.2f} s wall"
    print(figures)
    assert abs(busy - ran) <= TOLERANCE * ran, figures
    assert abs(busy - could_run) <= TOLERANCE * could_run, figures

    qmp.execute("stop")
    await sample_now(database, process.pid, record.uid)
    paused_from = await metered(database, record.uid)
    await asyncio.sleep(PAUSED_SECONDS)
    await sample_now(database, process.pid, record.uid)
    paused = await metered(database, record.uid)
    print(f"paused {PAUSED_SECONDS} s: {paused.cpu_seconds - paused_from.cpu_seconds:.3f} CPU s")
    assert paused.cpu_seconds - paused_from.cpu_seconds <= PAUSED_CPU_MAX
    assert paused.uptime_seconds - paused_from.uptime_seconds == pytest.approx(PAUSED_SECONDS, abs=1.0)
    # It still holds its memory (TCG's code cache and the guest's pages): that accrues.
    assert paused.memory_mib_seconds - paused_from.memory_mib_seconds > 16 * PAUSED_SECONDS


CONFIG = """
module "spin" {
  source  = "../tofu/modules/qemu-vm"
  name    = "spin"
  memory  = 128
  accel   = "tcg"
  kernel  = "tiny-guest/vmlinuz"
  initrd  = "tiny-guest/initramfs.cpio.gz"
  cmdline = "rdinit=/bin/sh -- -c \\"echo TOFU-SPIN; while :; do :; done\\""
  disks   = [{ name = "scratch", size = "8" }]
}
"""
# guest-nice 0: on this shared machine a niced guest in its own autogroup may get almost no CPU.
SERVER_ARGS = ("--usage-sample-seconds", "1", "--liveness-seconds", "600", "--guest-nice", "0")
_SERIES = r'tofu_qemu_vm_cpu_seconds_total\{{host="[^"]+",project="lab",uid="{uid}",vm="spin"\}} ([0-9.e+]+)'


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def spin_for(pid: int, cpu_seconds: float) -> None:
    """Wait until QEMU has burned `cpu_seconds` more (on a loaded host that takes longer)."""
    start = cpu_ticks(pid)
    wait_until(
        lambda: cpu_ticks(pid) - start >= cpu_seconds * TICKS_PER_SECOND,
        timeout=BUSY_DEADLINE_SECONDS,
        what=f"QEMU to burn {cpu_seconds} s of CPU",
    )


def usage_of(host: VmHost) -> dict[str, Any]:
    answer = host.request("GET", "/api/v1/projects/lab/usage")
    assert answer.status == 200, answer.body
    report: dict[str, Any] = answer.json()
    return report


def metric(host: VmHost, uid: str) -> float | None:
    answer = host.request("GET", "/metrics")
    assert answer.status == 200
    found = re.search(_SERIES.format(uid=uid), answer.body.decode())
    return float(found[1]) if found else None


def test_the_server_meters_exactly_across_a_controller_restart_and_keeps_it_after_deletion(
    make_vm_host: MakeVmHost, terraform_bin: str
) -> None:
    """Terraform declares a spinning VM; `serve` is stopped and started again while QEMU runs
    on; then QEMU is frozen (SIGSTOP), so its counter stops: the stored CPU seconds catch up with
    the kernel's count to the tick, none lost and none twice. After `destroy` the usage stays and
    the VM's metric series go."""
    host = make_vm_host()
    host.start("serve", extra_args=SERVER_ARGS)
    terraform = terraform_for(
        terraform_bin,
        write_config(host.root / "config", CONFIG),
        state_url=host.state_url("lab"),
        scratch=host.root / "tf-scratch",
    )
    terraform.run("init")
    terraform.run("apply", "-auto-approve")
    vm = host.wait_vm("lab", "spin", is_running_current, what="Running")
    pid, uid = vm["status"]["pid"], vm["metadata"]["uid"]
    wait_until(lambda: metric(host, uid), timeout=30, what="the VM's CPU series")
    spin_for(pid, 1.0)
    host.stop("serve")
    spin_for(pid, 0.5)  # unwatched: the next controller counts this from the stored cursor
    host.start("serve")
    host.wait_vm("lab", "spin", lambda found: found["status"].get("pid") == pid, what="adopted")
    spin_for(pid, 0.5)
    os.kill(pid, signal.SIGSTOP)
    try:
        charged = cpu_ticks(pid) / TICKS_PER_SECOND

        def caught_up() -> dict[str, Any] | None:
            report = usage_of(host)
            total = report["vms"][0]["total"] if report["vms"] else None
            return report if total and abs(total["cpuSeconds"] - charged) <= 0.015 else None

        report = wait_until(
            caught_up,
            timeout=30,
            what=f"the stored CPU seconds to reach {charged}",
            describe=lambda: json.dumps(usage_of(host)),
        )
        (spin,) = report["vms"]
        started = datetime.fromisoformat(vm["status"]["startedAt"])
        stored = spin["total"]
        print(f"charged {charged:.2f} s, stored {stored['cpuSeconds']:.2f} s")
        assert spin["name"] == "spin"
        assert spin["total"]["diskBytes"] > 0
        lived = (datetime.now(UTC) - started).total_seconds()
        assert stored["uptimeSeconds"] == pytest.approx(lived, abs=3.0)
        assert 0 < (metric(host, uid) or 0) <= charged  # counted since this controller started
    finally:
        os.kill(pid, signal.SIGCONT)

    terraform.run("destroy", "-auto-approve")
    host.wait_gone("lab", "spin")
    wait_until(lambda: metric(host, uid) is None, timeout=30, what="the VM's series to go")
    (kept,) = usage_of(host)["vms"]
    assert (kept["uid"], kept["name"]) == (uid, "spin")
    assert kept["total"]["cpuSeconds"] >= charged
