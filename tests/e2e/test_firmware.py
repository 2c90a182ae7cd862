"""UEFI, the per-VM NVRAM, secure boot and the TPM, end to end: a real server, real QEMU (TCG),
Debian's OVMF and swtpm, and the tiny guest (docs/firmware.md).

What each test can honestly show:
- the EFI boot path: the guest kernel is an EFI stub; with `-kernel`, OVMF starts it through the
  firmware, and the stub and the kernel say so on the serial console;
- the NVRAM persists: OVMF counts boots in its `MTC` variable (MonotonicCounter), which the
  test reads from the vars file itself: 1 after the first boot, 2 after a restart. A file made
  anew from the template would hold 1 again;
- the TPM: the EFI stub measures the initrd into PCR 9 through the firmware's TCG2 protocol
  (which only exists with a TPM), and the guest kernel binds tpm_crb to the ACPI TPM2 device;
- secure boot: a disk whose \\EFI\\BOOT\\BOOTX64.EFI is unsigned (the guest kernel with its
  Authenticode signature cut off) is refused with "Access Denied", and the same disk starts
  without secure boot. (`-kernel` cannot show it: Debian's OVMF 2022.11 falls back to its legacy
  Linux loader when the image fails verification, so a direct kernel boot still boots.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api.testing.waiting import wait_until
from controller.qemu.firmware import OVMF_DIR, OVMF_VARS
from controller.qemu.process import is_running_process, read_cmdline
from tests.e2e.conftest import MakeVmHost
from tests.e2e.harness import (
    ServerProcess,
    VmHost,
    condition,
    is_running_current,
)

pytestmark = pytest.mark.e2e

PROJECT = "firmware"
# no_timer_check: a vCPU starved by a busy host fails the kernel's IO-APIC timer check and panics.
KERNEL = {
    "kernel": "tiny-guest/vmlinuz",
    "initrd": "tiny-guest/initramfs.cpio.gz",
    "cmdline": "no_timer_check",
}
FORWARD = {"forwards": [{"guestPort": 80}]}
# OVMF (and a TPM) cost about twice the CPU of SeaBIOS under TCG (docs/firmware.md#cost); on a
# shared 2-core host at nice 10 and load 20, a UEFI boot took minutes of wall time.
FIRMWARE_BOOT_TIMEOUT = 600.0
VM_PATH = f"/apis/tofu-qemu.dev/v1alpha1/projects/{PROJECT}/qemuvms"
QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
# EDK2's variable store: the firmware volume header's length, then a 28-byte store header, then
# variables, each a 60-byte authenticated header, its UTF-16 name and its data, 4-byte aligned.
_FV_SIGNATURE_OFFSET = 40
_FV_HEADER_LENGTH_OFFSET = 48
_STORE_HEADER = 28
_VARIABLE_HEADER = 60
_VARIABLE_START = 0x55AA
_VARIABLE_LIVE_STATES = (0x3F, 0x3E)  # VAR_ADDED, and VAR_ADDED while its old copy is deleted


def efi_variables(data: bytes) -> dict[str, bytes]:
    """The live variables of an OVMF vars file, by name."""
    assert data[_FV_SIGNATURE_OFFSET : _FV_SIGNATURE_OFFSET + 4] == b"_FVH", "not a firmware volume"
    offset = struct.unpack_from("<H", data, _FV_HEADER_LENGTH_OFFSET)[0] + _STORE_HEADER
    found: dict[str, bytes] = {}
    while offset + _VARIABLE_HEADER <= len(data):
        start, state = struct.unpack_from("<HB", data, offset)
        if start != _VARIABLE_START:
            break
        name_size, data_size = struct.unpack_from("<II", data, offset + 36)
        name_at = offset + _VARIABLE_HEADER
        name = data[name_at : name_at + name_size].decode("utf-16-le").rstrip("\0")
        if state in _VARIABLE_LIVE_STATES:
            found[name] = data[name_at + name_size : name_at + name_size + data_size]
        offset = (name_at + name_size + data_size + 3) & ~3
    return found


def boot_count(nvram: Path) -> int:
    """OVMF's MonotonicCounter high word: one more on every boot of these variables."""
    return int.from_bytes(efi_variables(nvram.read_bytes())["MTC"], "little")


def counted(nvram: Path) -> int | None:
    """boot_count, or None while OVMF is halfway through writing a variable."""
    try:
        return boot_count(nvram)
    except (KeyError, ValueError):
        return None


def declare(server: ServerProcess, serial: int, vms: dict[str, dict[str, Any]]) -> None:
    server.declare_vms(PROJECT, serial, vms)


def serial_log(host: VmHost, vm: dict[str, Any]) -> str:
    path = host.data_dir / "run" / vm["metadata"]["uid"] / "serial.log"
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def wait_serial(host: VmHost, vm: dict[str, Any], text: str) -> str:
    def check() -> str | None:
        log = serial_log(host, vm)
        return log if text in log else None

    return wait_until(
        check,
        timeout=FIRMWARE_BOOT_TIMEOUT,
        what=f"{text!r} on the serial console of {vm['metadata']['name']}",
        describe=lambda: serial_log(host, vm)[-3000:],
    )


def nvram_rows(server: ServerProcess) -> list[dict[str, Any]]:
    disks = server.get_json(f"/api/v1/projects/{PROJECT}/disks")["items"]
    return [disk for disk in disks if disk["name"].startswith("nvram")]


def nvram_path(host: VmHost, vm: dict[str, Any]) -> Path:
    rows = host.sql("SELECT path FROM disks WHERE uid = ? AND name LIKE 'nvram%'", vm["metadata"]["uid"])
    assert len(rows) == 1, rows
    return Path(rows[0][0])


def swtpm_pid(host: VmHost, vm: dict[str, Any]) -> int | None:
    """The VM's live swtpm, by its launch record."""
    record = host.data_dir / "run" / vm["metadata"]["uid"] / "tpm" / "launch.json"
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(json.loads(record.read_text())["pid"])
        if is_running_process(pid) and (read_cmdline(pid) or ("",))[0] == "swtpm":
            return pid
    return None


@pytest.fixture
def firmware_host(make_vm_host: MakeVmHost) -> Iterator[VmHost]:
    """A VmHost whose swtpm processes are killed at teardown too (the harness kills QEMUs)."""
    host = make_vm_host()
    yield host
    for record in (host.data_dir / "run").glob("*/tpm/swtpm.pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            os.kill(int(record.read_text().strip()), signal.SIGKILL)


def restarted(vm: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda now: is_running_current(now) and now["status"]["pid"] != vm["status"]["pid"]


def test_uefi_boot_with_a_tpm_nvram_kept_across_restarts_and_deleted_with_the_vm(
    firmware_host: VmHost,
) -> None:
    host = firmware_host
    server = host.start("serve")
    spec = {
        "memory": 256,
        "accel": "tcg",
        "stopTimeout": 10,
        "boot": KERNEL,
        "network": FORWARD,
        "firmware": {"type": "uefi"},
        "tpm": {"persistent": True},
    }
    declare(server, 1, {"efi": spec})
    vm = host.wait_vm(PROJECT, "efi", is_running_current, what="Running")
    log = wait_serial(host, vm, "TOFU-GUEST-READY")
    # Booted through OVMF: the EFI stub ran, the kernel found EDK II's system table.
    assert "EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path" in log
    assert "efi: EFI v2.70 by EDK II" in log
    assert "secureboot: Secure boot disabled" in log
    # The TPM: measured into by the stub through the firmware, bound by the guest's driver.
    assert "EFI stub: Measured initrd data into PCR 9" in log
    assert "ACPI: TPM2" in log
    assert "tpm_crb MSFT0101:00" in log
    argv = read_cmdline(vm["status"]["pid"]) or ()
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_DIR / 'OVMF_CODE_4M.fd'}" in argv
    assert "tpm-crb,tpmdev=tpm0" in argv

    # The NVRAM: listed like a disk, private, written by OVMF's first boot.
    nvram = nvram_path(host, vm)
    assert [(d["vm"], d["name"], d["reclaimPolicy"]) for d in nvram_rows(server)] == [
        ("efi", "nvram.fd", "Delete")
    ]
    assert nvram.stat().st_mode & 0o777 == 0o600
    assert nvram.read_bytes() != Path(OVMF_DIR / OVMF_VARS).read_bytes()
    assert boot_count(nvram) == 1
    inode = nvram.stat().st_ino
    tpm_pid = swtpm_pid(host, vm)
    assert tpm_pid is not None

    # A controller restart adopts QEMU and swtpm alike: both run on, watched again.
    assert host.stop() == 0
    server = host.start("serve")
    adopted = host.wait_vm(PROJECT, "efi", is_running_current, what="adopted")
    assert adopted["status"]["pid"] == vm["status"]["pid"]
    wait_until(lambda: "tpm_adopted" in server.log_since_last_start(), timeout=30, what="swtpm adopted")
    assert swtpm_pid(host, vm) == tpm_pid

    # A restart of the VM: a new QEMU and a new swtpm, the same NVRAM, which counted the boot.
    answer = server.request("POST", f"{VM_PATH}/efi/restart", body=b"{}")
    assert answer.status in (200, 201, 202), answer.body
    again = host.wait_vm(PROJECT, "efi", restarted(vm), what="restarted", timeout=FIRMWARE_BOOT_TIMEOUT)
    # OVMF counts the boot early, long before the guest is up: no second full boot is waited for.
    wait_until(lambda: counted(nvram) == 2, timeout=FIRMWARE_BOOT_TIMEOUT, what="the second boot counted")
    assert nvram.stat().st_ino == inode
    new_tpm = swtpm_pid(host, again)
    assert new_tpm is not None
    assert new_tpm != tpm_pid
    assert not is_running_process(tpm_pid), "the old swtpm ended with its QEMU"

    # swtpm killed under a running guest: the guest lost its TPM, so the VM is restarted.
    os.kill(new_tpm, signal.SIGKILL)
    third = host.wait_vm(
        PROJECT, "efi", restarted(again), what="restarted after swtpm died", timeout=FIRMWARE_BOOT_TIMEOUT
    )
    assert swtpm_pid(host, third) not in (None, new_tpm)

    # Deleted: QEMU, swtpm, the NVRAM (reclaimPolicy Delete) and the runtime dir are gone.
    declare(server, 2, {})
    host.wait_gone(PROJECT, "efi")
    assert not nvram.exists()
    assert nvram_rows(server) == []
    assert not (host.data_dir / "run" / vm["metadata"]["uid"]).exists()
    assert swtpm_pid(host, vm) is None


def unsigned_efi_disk(images_dir: Path, kernel: Path) -> str:
    """A raw disk image (MBR, FAT16) whose \\EFI\\BOOT\\BOOTX64.EFI is `kernel` (an EFI-stub
    PE) with its Authenticode signature cut off; returns its name in the images dir."""
    data = bytearray(kernel.read_bytes())
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[pe : pe + 4] == b"PE\0\0"
    optional = pe + 24
    assert struct.unpack_from("<H", data, optional)[0] == 0x20B, "a PE32+ image"
    security = optional + 112 + 8 * 4  # data directory 4: the certificate table
    offset, size = struct.unpack_from("<II", data, security)
    if size:
        struct.pack_into("<II", data, security, 0, 0)
        del data[offset:]
    tree = images_dir / "firmware-test" / "esp"
    (tree / "EFI" / "BOOT").mkdir(parents=True, exist_ok=True)
    (tree / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(bytes(data))
    image = images_dir / "firmware-test" / "unsigned-esp.raw"
    # QEMU's vvfat presents the folder as a FAT disk with a partition table; converting it gives
    # an image without root or mtools.
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", f"fat:{tree}", str(image)], check=True, timeout=60)
    return "firmware-test/unsigned-esp.raw"


def test_secure_boot_refuses_an_unsigned_loader_and_a_retained_nvram_is_adopted(
    firmware_host: VmHost,
) -> None:
    host = firmware_host
    disk = unsigned_efi_disk(host.images_dir, host.images_dir / "tiny-guest" / "vmlinuz")

    def spec(secure_boot: bool) -> dict[str, Any]:
        return {
            "memory": 256,
            "accel": "tcg",
            "stopTimeout": 2,
            "boot": None,  # the harness's manifests boot the tiny guest's kernel by default
            "disks": [{"name": "esp", "image": disk}],
            "firmware": {"type": "uefi", "secureBoot": secure_boot, "reclaimPolicy": "Retain"},
        }

    server = host.start("serve")
    declare(server, 1, {"secure": spec(True), "plain": spec(False)})
    secure = host.wait_vm(PROJECT, "secure", is_running_current, what="Running")
    plain = host.wait_vm(PROJECT, "plain", is_running_current, what="Running")
    refused = wait_serial(host, secure, "BdsDxe: failed to load Boot0001")
    started = wait_serial(host, plain, "BdsDxe: starting Boot0001")
    assert "Access Denied" in refused.split("failed to load Boot0001", 1)[1].splitlines()[0]
    assert "BdsDxe: starting Boot0001" not in refused
    argv = read_cmdline(secure["status"]["pid"]) or ()
    assert "q35,smm=on" in argv
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert "BdsDxe: failed to load Boot0001" not in started
    # The secure-boot VM's NVRAM came from the template with Microsoft's keys enrolled.
    variables = efi_variables(nvram_path(host, secure).read_bytes())
    assert {"PK", "KEK", "db", "dbx"} <= set(variables)

    # Deleted with reclaimPolicy Retain: the NVRAM stays, listed as retained, and a VM of the
    # same name gets it back (the same file, counting on from its boots).
    kept = nvram_path(host, secure)
    declare(server, 2, {"plain": spec(False)})
    host.wait_gone(PROJECT, "secure")
    assert [(d["vm"], d["name"], d["retained"]) for d in nvram_rows(server) if d["vm"] == "secure"] == [
        ("secure", "nvram.ms.fd", True)
    ]
    boots = boot_count(kept)
    declare(server, 3, {"secure": spec(True), "plain": spec(False)})
    back = host.wait_vm(PROJECT, "secure", is_running_current, what="re-created Running")
    assert back["metadata"]["uid"] != secure["metadata"]["uid"]
    assert nvram_path(host, back) == kept
    wait_serial(host, back, "BdsDxe: failed to load Boot0001")
    assert boot_count(kept) == boots + 1


def test_impossible_firmware_combinations_are_invalid_not_refused(firmware_host: VmHost) -> None:
    """The state is stored; the VM says what is wrong in Valid=False and never starts."""
    host = firmware_host
    server = host.start("serve")
    spec = {"machine": "microvm", "boot": KERNEL, "firmware": {"type": "uefi", "secureBoot": True}, "tpm": {}}
    declare(server, 1, {"odd": spec})
    vm = host.wait_vm(PROJECT, "odd", lambda vm: vm["status"]["phase"] == "Invalid", what="Invalid")
    message = condition(vm, "Valid")["message"]
    assert condition(vm, "Valid")["status"] == "False"
    assert "firmware.secureBoot needs machine q35 (SMM), not microvm" in message
    assert "tpm needs machine q35" in message
    assert vm["status"]["pid"] is None
