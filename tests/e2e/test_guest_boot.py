"""The tiny guest from hack/build-guest boots under real QEMU, answers HTTP and obeys ACPI power-off.

Every QEMU here runs with TCG, never KVM: on these machines /dev/kvm comes from nested
virtualisation and hangs a normal guest (docs/guest.md). Each test starts its own QEMU through the
`launch` fixture, which kills it on teardown and prints its serial log when the test failed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from tests.e2e.harness import get_guest_page

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
READY_MARKER = b"TOFU-GUEST-READY"
FAILED_MARKER = b"TOFU-GUEST-FAILED"
POWEROFF_MARKER = b"TOFU-GUEST-POWEROFF"
SETUP_TIMEOUT = 600.0  # a cold apt install plus kernel download; cached it takes well under a second
QMP_TIMEOUT = 10.0
BOOT_TIMEOUT = 45.0  # 2.3 s idle, 4-6 s on 2 busy cores: TCG is CPU-bound, so allow for loaded CI
HTTP_TIMEOUT = 10.0
POWERDOWN_TIMEOUT = 10.0  # the guest powers off within about 0.1 s of the button press
HOSTFWD_BUSY = "Could not set up host forwarding rule"

Disk = Literal["initramfs", "virtio", "nvme"]


@dataclass(frozen=True, slots=True)
class GuestImage:
    vmlinuz: Path
    initramfs: Path
    rootfs: Path


class QmpError(Exception):
    """QEMU answered a QMP command with an error."""


class Qmp:
    """QMP over a unix socket, just enough for these tests: line-delimited JSON, the greeting, then
    qmp_capabilities (QEMU docs/interop/qmp-spec.rst, sections 2.2 and 4)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: Path, *, timeout: float, is_alive: Callable[[], bool]) -> Qmp:
        """Connect and negotiate; retry while QEMU starts (its socket may not listen yet)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                sock.connect(str(path))
                qmp = cls(sock)
                greeting = qmp.read_message()
                if "QMP" not in greeting:
                    raise QmpError(f"not a QMP greeting: {greeting}")
                qmp.execute("qmp_capabilities")
                sock.settimeout(timeout)  # the deadline for every later command and read
                return qmp
            except (OSError, EOFError):
                sock.close()
                if not is_alive() or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def read_message(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise EOFError("QEMU closed the QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            message = self.read_message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpError(f"{command}: {message['error']}")
            elif "return" in message:
                return message["return"]

    def read_events_until_closed(self) -> list[dict[str, Any]]:
        """Collect events until QEMU closes the socket (it does when it exits)."""
        try:
            while True:
                message = self.read_message()
                if "event" in message:
                    self.events.append(message)
        except (EOFError, ConnectionResetError):
            return self.events

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@dataclass(slots=True)
class Guest:
    """One QEMU process running the tiny guest, its serial log, QMP socket and forwarded HTTP port."""

    name: str
    process: subprocess.Popen[bytes]
    workdir: Path
    port: int
    qmp: Qmp
    started: float = field(default_factory=time.monotonic)

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def diagnostics(self) -> str:
        serial = self.serial_log.read_text(errors="replace") if self.serial_log.exists() else "(none)"
        stderr = (self.workdir / "qemu.stderr").read_text(errors="replace")
        return f"--- QEMU stderr ---\n{stderr}\n--- serial log ({self.serial_log}) ---\n{serial[-8000:]}"

    def wait_ready(self, *, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for the ready marker on the serial console; return the seconds since spawn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            serial = self.serial_log.read_bytes() if self.serial_log.exists() else b""
            if FAILED_MARKER in serial:
                raise AssertionError(f"guest {self.name} reported a failure\n{self.diagnostics()}")
            if READY_MARKER in serial:
                return time.monotonic() - self.started
            if self.process.poll() is not None:
                raise AssertionError(
                    f"QEMU exited (rc {self.process.returncode}) before the guest was ready\n"
                    + self.diagnostics()
                )
            time.sleep(0.02)
        raise AssertionError(f"no {READY_MARKER.decode()} within {timeout} s\n{self.diagnostics()}")

    def get(self, path: str, *, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
        """GET through the host forward (retried until the guest really answers)."""
        try:
            return get_guest_page(self.port, path, timeout=timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.diagnostics()}") from err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.qmp.close()


Launch = Callable[..., Guest]


def has_root_for_apt() -> bool:
    if os.geteuid() == 0:
        return True
    sudo = shutil.which("sudo")
    return sudo is not None and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0


def run_setup_step(script: str) -> None:
    proc = subprocess.run(
        [str(REPO / "hack" / script)], capture_output=True, text=True, timeout=SETUP_TIMEOUT, check=False
    )
    assert proc.returncode == 0, f"hack/{script} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    """Install QEMU if needed and build the guest into the repo's cache (.cache/guest)."""
    has_qemu = shutil.which("qemu-system-x86_64") is not None and shutil.which("qemu-img") is not None
    if shutil.which("apt-get") is None and not has_qemu:
        pytest.skip("QEMU is not installed and this machine has no apt-get to install it")
    if not has_qemu and not has_root_for_apt():
        pytest.skip("QEMU is not installed and apt-get cannot run: not root and no passwordless sudo")
    run_setup_step("install-qemu")
    run_setup_step("build-guest")
    out = REPO / ".cache" / "guest"
    return GuestImage(out / "vmlinuz", out / "initramfs.cpio.gz", out / "rootfs.raw")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def qemu_argv(image: GuestImage, workdir: Path, *, name: str, port: int, disk: Disk) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    cmdline = f"console=ttyS0 panic=-1 tofu.name={name}"
    argv = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-accel", "tcg",
        "-machine", "q35",
        "-m", "256",
        "-display", "none",
        "-serial", f"file:{workdir / 'serial.log'}",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-no-reboot",  # with panic=-1, a guest panic ends QEMU instead of looping
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:80",
        "-device", "virtio-net-pci,netdev=n0",
        "-kernel", str(image.vmlinuz),
    ]  # fmt: skip
    overlay = workdir / "overlay.qcow2"
    if disk == "initramfs":
        argv += ["-initrd", str(image.initramfs)]
    elif disk == "virtio":
        argv += ["-initrd", str(image.initramfs), "-drive", f"file={overlay},if=virtio,format=qcow2"]
        cmdline += " root=/dev/vda"
    else:
        argv += ["-drive", f"file={overlay},if=none,id=d0,format=qcow2", "-device", "nvme,drive=d0,serial=d0"]
        cmdline += " root=/dev/nvme0n1 rw devtmpfs.mount=1"
    return [*argv, "-append", cmdline]


def spawn_qemu(argv: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], Qmp] | None:
    """Start QEMU and connect to its QMP socket; None when the forwarded port was taken meanwhile."""
    with (workdir / "qemu.stderr").open("wb") as stderr:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    try:
        return process, Qmp.connect(
            workdir / "qmp.sock", timeout=QMP_TIMEOUT, is_alive=lambda: process.poll() is None
        )
    except (OSError, EOFError, QmpError) as err:
        process.kill()
        process.wait(timeout=10)
        stderr_text = (workdir / "qemu.stderr").read_text(errors="replace")
        if HOSTFWD_BUSY in stderr_text:
            return None  # the port was free at bind-and-close but taken before QEMU bound it
        raise AssertionError(f"QEMU did not start: {err!r}\n{stderr_text}") from err


def create_overlay(image: GuestImage, overlay: Path) -> None:
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    # An absolute backing path: a relative -b is resolved from the overlay's folder.
    backing = str(image.rootfs.resolve())
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", str(overlay)]
    subprocess.run(argv, check=True, timeout=30)


@pytest.fixture
def launch(
    request: pytest.FixtureRequest, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launch]:
    """`launch(name, disk=..., extra_args=...)` starts a guest and returns once QMP answers; all are
    killed on teardown. `extra_args` go before the final `-append`."""
    guests: list[Guest] = []
    failed_before = request.session.testsfailed

    def launch(name: str, *, disk: Disk = "initramfs", extra_args: Sequence[str] = ()) -> Guest:
        workdir = tmp_path_factory.mktemp("vm")  # short: a unix socket path must fit in 108 bytes
        if disk != "initramfs":
            create_overlay(guest_image, workdir / "overlay.qcow2")
        for _attempt in range(5):
            port = free_port()
            started = time.monotonic()
            argv = qemu_argv(guest_image, workdir, name=name, port=port, disk=disk)
            spawned = spawn_qemu([*argv[:-2], *extra_args, *argv[-2:]], workdir)
            if spawned is not None:
                process, qmp = spawned
                guest = Guest(
                    name=name, process=process, workdir=workdir, port=port, qmp=qmp, started=started
                )
                guests.append(guest)
                return guest
        raise AssertionError("no free loopback port for the HTTP forward after 5 tries")

    try:
        yield launch
    finally:
        for guest in guests:
            guest.kill()
        if request.session.testsfailed > failed_before:
            print_to_terminal(request, "\n\n".join(g.diagnostics() for g in guests))


def print_to_terminal(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's output capture: the test's own report is already written by now."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(text, file=sys.stderr)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{request.node.nodeid}: guest logs\n{text}", file=sys.stderr)


def test_guest_boots_and_serves_its_name_over_http(launch: Launch) -> None:
    """A q35 TCG guest reaches the ready marker and serves a page naming the VM from its cmdline.
    Without a cloud-init seed there is no /cidata/ (test_guest_cidata.py has one)."""
    guest = launch("vm-alpha")
    guest.wait_ready()

    status, body = guest.get("/")

    assert status == 200
    assert "<h1>vm-alpha</h1>" in body
    assert guest.get("/cidata/user-data")[0] == 404


def test_system_powerdown_makes_qemu_exit(launch: Launch) -> None:
    """QMP system_powerdown presses the ACPI button; the guest powers off and QEMU exits by itself."""
    guest = launch("vm-bravo")
    guest.wait_ready()

    guest.qmp.execute("system_powerdown")
    returncode = guest.process.wait(timeout=POWERDOWN_TIMEOUT)
    events = guest.qmp.read_events_until_closed()

    assert returncode == 0
    assert POWEROFF_MARKER in guest.serial_log.read_bytes()
    shutdowns = [e["data"] for e in events if e["event"] == "SHUTDOWN"]
    assert shutdowns == [{"guest": True, "reason": "guest-shutdown"}]


@pytest.mark.parametrize("disk", ["virtio", "nvme"], ids=["virtio-blk-with-initramfs", "nvme-no-initramfs"])
def test_qcow2_overlay_of_rootfs_boots_and_serves_http(launch: Launch, disk: Disk) -> None:
    """A qcow2 overlay backed by rootfs.raw is a bootable root disk that serves HTTP."""
    guest = launch("vm-disk", disk=disk)
    guest.wait_ready()

    status, body = guest.get("/info.txt")

    assert status == 200
    assert "name=vm-disk\n" in body
