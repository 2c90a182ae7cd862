"""Snapshots and restores end to end (docs/snapshots.md): real Terraform declares a QemuVM whose
root disk is an overlay on the tiny guest's rootfs.raw, then QemuVMSnapshots and QemuVMRestores
of it through the qemu-snapshot module; real QEMU runs it on TCG. The guest's marker CGI writes
a file on its root disk: a marker written before a snapshot is read back after the restore,
over one written after it, for a snapshot of the running VM (QMP) and one of the stopped VM
(qemu-img). Deleting a snapshot deletes its data; kill -9 of QEMU or of the controller in the
middle of a snapshot leaves every disk clean for `qemu-img check`, and the snapshot is retried.

One VM for the whole module: every step is a further apply of the same configuration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.testing.waiting import wait_until
from controller.faults import CRASH_ENV, CrashPoint
from tests.e2e.conftest import open_vm_host
from tests.e2e.harness import (
    GUEST_BOOT_TIMEOUT,
    ServerProcess,
    Terraform,
    VmHost,
    get_guest_page,
    host_port,
    is_running_current,
    terraform_for,
    write_config,
)
from tests.e2e.test_cli import Cli

pytestmark = pytest.mark.e2e

PROJECT = "snaps"
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
# A snapshot, a restore (a graceful stop), a crashed server's restart: seconds on a quiet host.
SNAPSHOT_WAIT = 120.0
# A boot of the guest from its disk: 5-8 s on a quiet host, but TCG boots are CPU-bound, and at
# load 30-150 on 2 cores they took 3-6 minutes. These are waits for a condition, never sleeps.
BOOT_WAIT = 6 * GUEST_BOOT_TIMEOUT
CONFIG = """
variable "snapshots" {
  type    = map(string)   # snapshot name -> VM name
  default = {}
}

variable "restores" {
  type    = map(string)   # restore name -> snapshot name
  default = {}
}

resource "terraform_data" "web" {
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = "QemuVM"
    metadata   = { name = "web" }
    spec = {
      memory      = 256
      accel       = "tcg"
      stopTimeout = 10
      runStrategy = "RerunOnFailure"
      boot = {
        kernel  = "tiny-guest/vmlinuz"
        initrd  = "tiny-guest/initramfs.cpio.gz"
        cmdline = "root=/dev/vda no_timer_check" # a starved vCPU fails the IO-APIC timer check
      }
      disks       = [{ name = "root", image = "tiny-guest/rootfs.raw" }, { name = "data", size = "8Mi" }]
      network     = { forwards = [{ guestPort = 80 }] }
    }
  }
}

module "snapshot" {
  source   = "../tofu/modules/qemu-snapshot"
  for_each = var.snapshots
  name     = each.key
  vm       = each.value
}

module "restore" {
  source   = "../tofu/modules/qemu-snapshot"
  for_each = var.restores
  name     = each.key
  kind     = "QemuVMRestore"
  vm       = "web"
  snapshot = each.value
}
"""


@dataclass
class World:
    host: VmHost
    server: ServerProcess
    terraform: Terraform
    tfvars: Path

    def apply(self, *, snapshots: dict[str, str], restores: dict[str, str], check: bool = True) -> None:
        self.tfvars.write_text(json.dumps({"snapshots": snapshots, "restores": restores}), encoding="utf-8")
        self.terraform.run("apply", "-auto-approve", check=check)

    def running(self, *, other_than: int | None = None) -> dict[str, Any]:
        return self.host.wait_vm(
            PROJECT,
            "web",
            lambda vm: is_running_current(vm) and vm["status"]["pid"] != other_than,
            what="Running",
            timeout=BOOT_WAIT,
        )

    def marker(self, vm: dict[str, Any], value: str = "") -> str:
        path = "/cgi-bin/marker" + (f"?{value}" if value else "")
        status, body = get_guest_page(host_port(vm), path, timeout=BOOT_WAIT)
        assert status == 200, body
        return body.strip()

    def object(self, plural: str, name: str, accept: Any, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            answer = self.server.request("GET", f"/api/v1/projects/{PROJECT}/{plural}/{name}")
            found = answer.json() if answer.status == 200 else None
            return found if found is not None and accept(found) else None

        return wait_until(check, timeout=SNAPSHOT_WAIT, what=f"{plural}/{name}: {what}")

    def vm_action(self, verb: str) -> None:
        answer = self.server.request(
            "POST", f"/apis/tofu-qemu.dev/v1alpha1/projects/{PROJECT}/qemuvms/web/{verb}"
        )
        assert answer.status == 200, answer.body

    def disk(self, name: str = "root") -> Path:
        uid: str = self.host.vm(PROJECT, "web")["metadata"]["uid"]
        return self.host.data_dir / "disks" / uid / f"{name}.qcow2"

    def restart(self, env: dict[str, str]) -> None:
        """Restart the server (the VM keeps running, and is adopted) with `env`."""
        self.server.stop()
        self.server.extra_env = env
        self.server.start()

    def crashed(self) -> None:
        wait_until(lambda: not self.server.is_running, timeout=SNAPSHOT_WAIT, what="the server to crash")
        assert self.server.stop() == -9, "it died by its own SIGKILL"

    def stop_vm(self) -> None:
        self.vm_action("stop")
        self.host.wait_vm(PROJECT, "web", lambda vm: vm["status"]["pid"] is None, what="stopped")

    def assert_tags(self, tags_wanted: list[str]) -> None:
        """Every disk holds exactly the snapshots named."""
        for name in ("root", "data"):
            assert sorted(tag.split(":")[1] for tag in tags(self.disk(name))) == sorted(tags_wanted), name

    def assert_disks_sound(self, tags_wanted: list[str]) -> dict[str, int]:
        """The VM is stopped; every disk passes `qemu-img check` with no corruption and no check
        error, and holds exactly the snapshots named. Returns the leaked clusters of each (space
        only: a QEMU killed while writing metadata may leave one). A live image is not checked:
        QEMU writes its metadata cache back when it closes the file, and `-U` reads around it."""
        leaks = {}
        for name in ("root", "data"):
            checked = subprocess.run(
                [QEMU_IMG, "check", "--output=json", str(self.disk(name))], capture_output=True, text=True
            )
            assert checked.returncode in (0, 3), checked.stdout + checked.stderr  # 3: leaks only
            report = json.loads(checked.stdout)
            assert (report["check-errors"], report.get("corruptions", 0)) == (0, 0), report
            leaks[name] = int(report.get("leaks", 0))
        self.assert_tags(tags_wanted)
        return leaks


def _ready(snapshot: dict[str, Any]) -> bool:
    return bool(snapshot["status"]["readyToUse"])


def _complete(restore: dict[str, Any]) -> bool:
    return bool(restore["status"]["complete"])


def tags(disk: Path) -> list[str]:
    listed = subprocess.run(
        [QEMU_IMG, "info", "-U", "--output=json", str(disk)], check=True, capture_output=True, text=True
    )
    return [snapshot["name"] for snapshot in json.loads(listed.stdout).get("snapshots", [])]


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, guest_images: Path, accel_cache: Path, terraform_bin: str
) -> Iterator[World]:
    host = open_vm_host(tmp_path_factory, guest_images, accel_cache)
    try:
        yield _world(host, terraform_bin)
    finally:
        host.close()


def _world(host: VmHost, terraform_bin: str) -> World:
    server = host.start("serve")
    workdir = write_config(host.root / "config", CONFIG)
    terraform = terraform_for(
        terraform_bin, workdir, state_url=host.state_url(PROJECT), scratch=host.root / "tf"
    )
    terraform.run("init")
    world = World(host, server, terraform, workdir / "terraform.tfvars.json")
    world.apply(snapshots={}, restores={})
    return world


def test_a_snapshot_of_the_running_vm_restores_the_marker(world: World) -> None:
    vm = world.running()
    assert world.marker(vm, "before-online") == "before-online"

    world.apply(snapshots={"online": "web"}, restores={})
    snapshot = world.object("snapshots", "online", _ready, "readyToUse")
    status = snapshot["status"]
    assert status["indications"] == ["Online", "NoGuestAgent"]
    assert status["sourceSpec"]["runStrategy"] == "RerunOnFailure"
    assert status["disks"] == ["data", "root"]
    assert status["pauseMs"] is not None
    assert world.host.vm(PROJECT, "web")["status"]["pid"] == vm["status"]["pid"], (
        "a snapshot restarts nothing"
    )
    disks = world.server.get_json(f"/api/v1/projects/{PROJECT}/disks")["items"]
    assert [d["sizeMiB"] for d in disks if d.get("snapshot") == "online"] == [32 + 8]

    assert world.marker(vm, "after-online") == "after-online"
    world.apply(snapshots={"online": "web"}, restores={"undo-online": "online"})
    world.object("restores", "undo-online", _complete, "complete")
    again = world.running(other_than=vm["status"]["pid"])
    assert world.marker(again) == "before-online"


def test_a_snapshot_of_the_stopped_vm_restores_the_marker(world: World) -> None:
    vm = world.running()
    assert world.marker(vm, "before-offline") == "before-offline"
    world.vm_action("stop")
    world.host.wait_vm(PROJECT, "web", lambda vm: vm["status"]["pid"] is None, what="stopped")

    snapshots = {"online": "web", "offline": "web"}
    world.apply(snapshots=snapshots, restores={"undo-online": "online"})
    snapshot = world.object("snapshots", "offline", _ready, "readyToUse")
    assert snapshot["status"]["indications"] == ["Offline", "NoGuestAgent"]

    world.vm_action("start")
    running = world.running()
    assert world.marker(running, "after-offline") == "after-offline"
    world.vm_action("stop")
    world.host.wait_vm(PROJECT, "web", lambda vm: vm["status"]["pid"] is None, what="stopped")
    world.apply(snapshots=snapshots, restores={"undo-online": "online", "undo-offline": "offline"})
    restore = world.object("restores", "undo-offline", _complete, "complete")
    assert restore["status"]["stoppedVm"] is False, "a stopped VM stays stopped"
    world.vm_action("start")
    assert world.marker(world.running()) == "before-offline"


def test_deleting_a_snapshot_deletes_its_data(world: World) -> None:
    disk = world.disk()
    world.assert_tags(["offline", "online"])
    world.apply(snapshots={"offline": "web"}, restores={})
    wait_until(
        lambda: [tag for tag in tags(disk) if ":online:" in tag] == [] or None,
        timeout=SNAPSHOT_WAIT,
        what="the online snapshot's data deleted",
    )
    world.assert_tags(["offline"])
    assert world.server.request("GET", f"/api/v1/projects/{PROJECT}/snapshots/online").status == 404

    # The same through the CLI: a snapshot asked for beside the declared ones, then deleted.
    cli = Cli(world.server)
    assert "requested" in cli.run("snapshot", "vm", "web", "by-hand", "-p", PROJECT)
    world.object("snapshots", "by-hand", _ready, "readyToUse")
    listed = cli.run("get", "snapshots", "-p", PROJECT)
    assert any(line.split()[1:4] == ["by-hand", "web", "true"] for line in listed.splitlines()), listed
    world.assert_tags(["offline", "by-hand"])
    assert "deleted" in cli.run("delete", "snapshot", "by-hand", "-p", PROJECT)
    wait_until(
        lambda: [tag for tag in tags(disk) if ":by-hand:" in tag] == [] or None,
        timeout=SNAPSHOT_WAIT,
        what="the CLI snapshot's data deleted",
    )
    world.assert_tags(["offline"])  # checked by `qemu-img check` once the VM is stopped, below


def test_a_kill_9_mid_snapshot_leaves_the_disks_sound_and_is_retried(world: World) -> None:
    """QEMU killed with its snapshot transaction in flight; the controller killed between the
    disks of a stopped VM, and after taking but before the status: each time the snapshot ends
    ready, in every disk once, and every disk passes `qemu-img check` (which also covers the
    deletions of the test before, made through QMP while the VM ran)."""
    taken = ["offline"]
    vm = world.running()
    world.restart({CRASH_ENV: CrashPoint.QEMU_MID_SNAPSHOT.value})
    world.apply(snapshots=dict.fromkeys([*taken, "qemu-killed"], "web"), restores={})
    world.object("snapshots", "qemu-killed", _ready, "readyToUse")
    assert world.host.vm(PROJECT, "web")["status"]["pid"] != vm["status"]["pid"], "QEMU was killed"
    taken.append("qemu-killed")
    world.stop_vm()
    leaks = world.assert_disks_sound(taken)
    assert sum(leaks.values()) <= 2, leaks  # a cluster the killed QEMU had allocated, at most

    files = {disk: world.disk(disk) for disk in ("root", "data")}  # asked while the server is up
    for point, name in ((CrashPoint.MID_SNAPSHOT, "mid"), (CrashPoint.AFTER_SNAPSHOT, "after")):
        world.restart({CRASH_ENV: point.value})
        world.apply(snapshots=dict.fromkeys([*taken, name], "web"), restores={}, check=False)
        world.crashed()
        held = {disk: [tag.split(":")[1] for tag in tags(path)] for disk, path in files.items()}
        # The disks are snapshotted in the order of their names: "data", then "root".
        whole = point is CrashPoint.AFTER_SNAPSHOT
        assert (name in held["data"], name in held["root"]) == (True, whole), held
        world.restart({})
        world.object("snapshots", name, _ready, "readyToUse")
        taken.append(name)
        assert world.assert_disks_sound(taken) == leaks, "qemu-img, killed or not, leaks nothing"
