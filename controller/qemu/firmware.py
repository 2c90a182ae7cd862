"""OVMF's flash drives, the VM's NVRAM and its TPM on QEMU's command line, and swtpm's. Pure.

The files come from Debian's `ovmf` package, as its QEMU firmware descriptors
(/usr/share/qemu/firmware/*.json) pair them: the 4 MiB build, plain or with secure boot. The
secure-boot build's vars template has Microsoft's keys enrolled (`.ms`), so secure boot is on
from the first start; it needs SMM (`-machine q35,smm=on`) and a flash only SMM code may write
(`cfi.pflash01` `secure=on`), or the guest OS could rewrite the variables that hold the keys.

The TPM is a TPM 2.0 CRB device backed by a per-VM `swtpm` (controller/qemu/swtpm.py) in
DATA/run/<uid>/tpm/. QEMU reaches its control socket by a path relative to its working directory
(the runtime dir), as it does its QMP socket: a UNIX socket path is limited to 107 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from api.types import FirmwareSpec, FirmwareType, QemuVMSpec
from controller.qemu.argv import RuntimePaths, option_value

OVMF_DIR = PurePath("/usr/share/OVMF")
OVMF_CODE = "OVMF_CODE_4M.fd"
OVMF_VARS = "OVMF_VARS_4M.fd"
OVMF_SECURE_CODE = "OVMF_CODE_4M.ms.fd"
OVMF_SECURE_VARS = "OVMF_VARS_4M.ms.fd"
# The NVRAM's names in the disk ledger: a disk's name is a DNS label, which has no '.', so a
# user's disk can never take one. One per template, so turning secure boot on never keeps
# variables without the keys (the old file is released like a disk the spec no longer names).
NVRAM_NAME = "nvram.fd"
SECURE_NVRAM_NAME = "nvram.ms.fd"

SWTPM_BINARY = "swtpm"
TPM_DIR_NAME = "tpm"
TPM_SOCKET_NAME = "swtpm.sock"
TPM_STATE_DIR_NAME = "state"


@dataclass(frozen=True, slots=True)
class Ovmf:
    """The firmware files a UEFI spec needs, and the ledger name of its NVRAM."""

    code: PurePath
    vars_template: PurePath
    nvram_name: str


def ovmf_for(firmware: FirmwareSpec, firmware_dir: PurePath = OVMF_DIR) -> Ovmf | None:
    """OVMF's code and vars template for `firmware`, or None for BIOS."""
    if firmware.type is not FirmwareType.UEFI:
        return None
    if firmware.secure_boot:
        return Ovmf(firmware_dir / OVMF_SECURE_CODE, firmware_dir / OVMF_SECURE_VARS, SECURE_NVRAM_NAME)
    return Ovmf(firmware_dir / OVMF_CODE, firmware_dir / OVMF_VARS, NVRAM_NAME)


def machine_options(spec: QemuVMSpec) -> str:
    """Appended to `-machine q35`: secure boot needs SMM."""
    return ",smm=on" if spec.firmware.secure_boot else ""


def platform_argv(spec: QemuVMSpec, ovmf: Ovmf | None, nvram: PurePath | None) -> tuple[str, ...]:
    """The flash drives (code read-only, the VM's own vars file writable) and the TPM device.

    :raise KeyError: a UEFI spec without its NVRAM path (the controller did not resolve it).
    """
    argv: list[str] = []
    if ovmf is not None:
        if nvram is None:
            raise KeyError("the NVRAM path of a UEFI VM")
        code = option_value(str(ovmf.code))
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}"]
        argv += ["-drive", f"if=pflash,format=raw,unit=1,file={option_value(str(nvram))}"]
        if spec.firmware.secure_boot:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    if spec.tpm is not None:
        argv += ["-chardev", f"socket,id=tpm0-ctrl,path={TPM_DIR_NAME}/{TPM_SOCKET_NAME}"]
        argv += ["-tpmdev", "emulator,id=tpm0,chardev=tpm0-ctrl", "-device", "tpm-crb,tpmdev=tpm0"]
    return tuple(argv)


def tpm_paths(runtime: RuntimePaths) -> RuntimePaths:
    """swtpm's own runtime dir inside the VM's: its lock, launch record, pidfile and stderr."""
    return RuntimePaths(runtime.directory / TPM_DIR_NAME, program="swtpm")


def swtpm_argv() -> tuple[str, ...]:
    """swtpm serving one QEMU on its control socket, and exiting when that QEMU goes
    (`--terminate`). Paths are relative to its working directory, the TPM dir."""
    return (
        SWTPM_BINARY,
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={TPM_STATE_DIR_NAME}",
        "--ctrl",
        f"type=unixio,path={TPM_SOCKET_NAME}",
        "--pid",
        "file=swtpm.pid",
        "--terminate",
    )
