"""Building the QEMU command line from a spec. Pure: no I/O, no clock.

Safety rules, so that a spec can never add a QEMU option:
- argv is a list handed to exec, never a shell string;
- every value placed inside a QEMU option string (`key=value,key=value`) goes through
  `option_value`, which doubles commas (QEMU's escape) and refuses control characters;
- free-standing values (`-append`, `-pidfile`) are single argv elements, and none may start
  with '-' where QEMU would read an option.
Names and image paths are already allow-listed by api/types.py; the escaping here also covers
the operator-chosen data dir, which may hold any character.

The QMP socket is given relative to QEMU's working directory (its runtime dir): UNIX socket
paths are limited to 107 bytes, which a deep data dir plus a uid can exceed. The controller
reaches it through /proc/self/fd/N/qmp.sock (see qemu/runtime.py), equally short.

Identity derives from the VM's uid: SMBIOS UUID, MAC address and disk serials survive restarts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePath

from api.types import Accel, Machine, Protocol, QemuVMSpec
from controller.qemu import netargs
from controller.qemu.agent_channel import agent_channel_argv

QEMU_BINARY = "qemu-system-x86_64"
# QEMU's own OUI for locally run guests; the rest comes from the uid.
MAC_PREFIX = "52:54:00"
DISK_SERIAL_LENGTH = 20
PROCESS_NAME_PREFIX = "tq-"
QMP_SOCKET_NAME = "qmp.sock"
# ttyS0's chardev: a socket the API's interactive console attaches to, which also logs every
# byte the guest writes to serial.log (docs/console.md).
SERIAL_SOCKET_NAME = "serial.sock"


class UnsafeValue(ValueError):
    """A value that cannot be placed in a QEMU command line safely."""


def option_value(value: str) -> str:
    """Escape `value` for a QEMU `key=value,...` option string.

    :raise UnsafeValue: for control characters, which no QEMU option value needs.
    """
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise UnsafeValue(f"control character in QEMU option value {value[:60]!r}")
    return value.replace(",", ",,")


def free_argument(value: str) -> str:
    """Check a value that stands alone in argv (after `-append`, `-pidfile`, ...)."""
    if value.startswith("-"):
        raise UnsafeValue(f"argument {value[:60]!r} would be read as a QEMU option")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise UnsafeValue(f"control character in QEMU argument {value[:60]!r}")
    return value


@dataclass(frozen=True, slots=True)
class RuntimePaths:
    """Where one VM's runtime files live: DATA/run/<uid>/ (and DATA/run/<uid>/tpm/ for its
    swtpm, whose files are named after `program`)."""

    directory: PurePath
    program: str = "qemu"

    @property
    def pidfile(self) -> PurePath:
        return self.directory / f"{self.program}.pid"

    @property
    def qmp_socket(self) -> PurePath:
        return self.directory / QMP_SOCKET_NAME

    @property
    def serial_log(self) -> PurePath:
        return self.directory / "serial.log"

    @property
    def serial_socket(self) -> PurePath:
        return self.directory / SERIAL_SOCKET_NAME

    @property
    def stderr_log(self) -> PurePath:
        return self.directory / f"{self.program}.stderr"

    @property
    def record(self) -> PurePath:
        """The launch record: argv, its digest and the process start time."""
        return self.directory / "launch.json"

    @property
    def exit_record(self) -> PurePath:
        return self.directory / "exit.json"

    @property
    def wait_status(self) -> PurePath:
        """QEMU's wait status, written by its supervisor (qemu/supervisor.py)."""
        return self.directory / "wait-status.json"

    @property
    def lock(self) -> PurePath:
        return self.directory / "lock"


@dataclass(frozen=True, slots=True)
class LaunchInputs:
    """Everything argv depends on besides the spec: resolved by the controller before spawning."""

    uid: str
    name: str
    accel: Accel
    runtime: RuntimePaths
    images_dir: PurePath
    disk_paths: dict[str, PurePath]
    host_ports: dict[tuple[Protocol, int], int]
    # Where forwards listen on the host; an IPv4 address checked by the settings.
    forward_address: str = "127.0.0.1"
    # The cloud-init NoCloud seed ISO, when the spec has cloudInit.
    seed_path: PurePath | None = None
    # OVMF's flash and the TPM (controller/qemu/firmware.py): appended to -machine, and argv.
    machine_options: str = ""
    platform: tuple[str, ...] = ()


def mac_address(uid: str) -> str:
    digest = hashlib.sha256(f"mac:{uid}".encode()).digest()
    return MAC_PREFIX + "".join(f":{byte:02x}" for byte in digest[:3])


def disk_serial(uid: str, disk_name: str) -> str:
    return hashlib.sha256(f"disk:{uid}:{disk_name}".encode()).hexdigest()[:DISK_SERIAL_LENGTH]


def process_name(uid: str) -> str:
    """/proc/PID/comm is cut to 15 characters; a uid prefix makes our processes recognisable."""
    return PROCESS_NAME_PREFIX + uid.replace("-", "")[:12]


def argv_digest(argv: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()


def build_argv(spec: QemuVMSpec, inputs: LaunchInputs) -> tuple[str, ...]:
    """The complete QEMU argv for `spec`. The VM starts paused (-S); the controller continues it.

    :raise UnsafeValue: a value that cannot be escaped (never one a valid spec produces).
    :raise KeyError: a disk path or host port the controller did not resolve.
    """
    if inputs.accel is Accel.AUTO:
        raise ValueError("the accelerator must be resolved (kvm or tcg) before building argv")
    microvm = spec.machine is Machine.MICROVM
    runtime = inputs.runtime
    argv: list[str] = [QEMU_BINARY, "-nodefaults", "-no-user-config", "-S"]
    argv += ["-name", f"guest={option_value(inputs.name)},process={process_name(inputs.uid)}"]
    argv += ["-uuid", free_argument(inputs.uid)]
    argv += [
        "-machine",
        spec.machine.value + inputs.machine_options,
        "-accel",
        inputs.accel.value,
        "-cpu",
        "max",
    ]
    argv += ["-smp", str(spec.cpus), "-m", f"{spec.memory}M"]
    argv += ["-display", "none", "-pidfile", free_argument(str(runtime.pidfile))]
    argv += ["-chardev", f"socket,id=qmp,path={QMP_SOCKET_NAME},server=on,wait=off"]
    argv += ["-mon", "chardev=qmp,mode=control"]
    argv += ["-chardev", serial_chardev(runtime)]
    argv += ["-serial", "chardev:serial0"]
    argv += inputs.platform
    if spec.boot is not None:
        argv += ["-kernel", free_argument(str(inputs.images_dir / spec.boot.kernel))]
        if spec.boot.initrd is not None:
            argv += ["-initrd", free_argument(str(inputs.images_dir / spec.boot.initrd))]
        cmdline = " ".join(filter(None, ["console=ttyS0", f"tofu.name={inputs.name}", spec.boot.cmdline]))
        argv += ["-append", cmdline]
    block_device = "virtio-blk-device" if microvm else "virtio-blk-pci"
    for disk in spec.disks:
        node = f"disk-{disk.name}"
        path = option_value(str(inputs.disk_paths[disk.name]))
        argv += ["-blockdev", f"driver=qcow2,node-name={node},file.driver=file,file.filename={path}"]
        argv += ["-device", f"{block_device},drive={node},serial={disk_serial(inputs.uid, disk.name)}"]
    if inputs.seed_path is not None:
        argv += seed_drive(spec.machine, inputs.seed_path)
    argv += netargs.netdev_argv(spec.network, inputs.host_ports, inputs.forward_address)
    net_device = "virtio-net-device" if microvm else "virtio-net-pci"
    argv += ["-device", f"{net_device},netdev=net0,mac={mac_address(inputs.uid)}"]
    argv += agent_channel_argv(spec)
    return tuple(argv)


def serial_chardev(runtime: RuntimePaths) -> str:
    """ttyS0 as a UNIX socket server (relative, as the QMP socket: a short path) that one client
    at a time may attach to, logging the guest's output to serial.log whether or not one is.
    QEMU drops output while no client is attached (the log still gets it) and truncates the log
    at each start (logappend defaults to off), which the console tail relies on."""
    log_path = option_value(str(runtime.serial_log))
    return f"socket,id=serial0,path={SERIAL_SOCKET_NAME},server=on,wait=off,logfile={log_path}"


def seed_drive(machine: Machine, path: PurePath) -> list[str]:
    """The NoCloud seed as a read-only SCSI CD-ROM (/dev/sr0 in the guest) on its own virtio-scsi
    controller. Not IDE/AHCI: Debian's cloud kernel (and so its genericcloud images) has no AHCI
    driver, while virtio-scsi is in every cloud kernel. Not a virtio-blk disk: a second vdX next
    to the root disk confuses some guests' device naming. cloud-init finds it by its label."""
    blockdev = (
        f"driver=raw,node-name=cidata,read-only=on,file.driver=file,file.filename={option_value(str(path))}"
    )
    controller = "virtio-scsi-device" if machine is Machine.MICROVM else "virtio-scsi-pci"
    return [
        "-blockdev",
        blockdev,
        "-device",
        f"{controller},id=seed-scsi",
        "-device",
        "scsi-cd,drive=cidata,bus=seed-scsi.0",
    ]
