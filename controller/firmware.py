"""What `plan` decides about a VM's firmware and TPM. Pure (docs/firmware.md).

- The NVRAM is a file kept like a disk: recorded in the disk ledger (under a name no disk can
  have), so it follows `firmware.reclaimPolicy`, is listed by `GET /api/v1/disks` and adopted
  by a re-created VM of the same name. It is made from OVMF's template before the first start.
- The TPM is a swtpm per QEMU: started just before it, gone with it (`--terminate`). A QEMU
  whose swtpm died has lost its TPM and is restarted; a swtpm without a QEMU is ended.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Protocol

from api.types import QemuVMSpec
from controller.actions import Action, AttachTpm, PrepareNvram, StartTpm, StopTpm
from controller.model import Desired, Observed, TpmObservation
from controller.qemu.argv import RuntimePaths
from controller.qemu.firmware import (
    OVMF_DIR,
    Ovmf,
    machine_options,
    ovmf_for,
    platform_argv,
)


class TpmFailed(Exception):
    """swtpm could not be started (missing, or it exited); the message says why. Retry later."""


class TpmEmulators(Protocol):
    """The VMs' swtpm processes (controller/qemu/swtpm.py). `paths` is the VM's runtime dir."""

    async def inspect(self, uid: str, paths: RuntimePaths) -> TpmObservation | None:
        """The VM's live swtpm proven ours, or None. Changes nothing."""
        ...

    async def start(self, uid: str, paths: RuntimePaths, *, persistent: bool) -> None:
        """End a swtpm left over, wipe the state unless `persistent`, start one and return when
        it listens. :raise TpmFailed: it cannot start."""
        ...

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        """Watch `pid` (adoption after a restart): its exit wakes the VM."""
        ...

    async def stop(self, uid: str, paths: RuntimePaths) -> None:
        """End the VM's swtpm, if it runs. Idempotent."""
        ...


def wanted_files(spec: QemuVMSpec) -> tuple[PurePath, ...]:
    """The OVMF files a start of `spec` reads (none for BIOS)."""
    ovmf = ovmf_for(spec.firmware, OVMF_DIR)
    return () if ovmf is None else (ovmf.code, ovmf.vars_template)


def nvram_held(spec: QemuVMSpec) -> frozenset[str]:
    """The ledger names of the NVRAM files the spec keeps (so they are not released as unused)."""
    ovmf = ovmf_for(spec.firmware, OVMF_DIR)
    return frozenset() if ovmf is None else frozenset({ovmf.nvram_name})


def nvram_path(spec: QemuVMSpec, observed: Observed, disks_dir: PurePath) -> PurePath | None:
    """Where the VM's NVRAM is: the recorded file (an adopted one keeps its path), or where it
    will be made."""
    ovmf = ovmf_for(spec.firmware, OVMF_DIR)
    if ovmf is None:
        return None
    record = observed.disks.get(ovmf.nvram_name)
    return record.path if record is not None else disks_dir / ovmf.nvram_name


def prepare_nvram(
    desired: Desired, spec: QemuVMSpec, observed: Observed, disks_dir: PurePath
) -> tuple[Action, ...]:
    """Make the NVRAM from its template when the VM has none yet."""
    ovmf = ovmf_for(spec.firmware, OVMF_DIR)
    if ovmf is None:
        return ()
    record = observed.disks.get(ovmf.nvram_name)
    if record is not None and record.exists:
        return ()
    path = nvram_path(spec, observed, disks_dir)
    assert path is not None
    return (
        PrepareNvram(
            ovmf.nvram_name,
            ovmf.vars_template,
            path,
            spec.firmware.reclaim_policy,
            desired.project,
            desired.name,
        ),
    )


def launch_pieces(spec: QemuVMSpec, observed: Observed, disks_dir: PurePath) -> tuple[str, tuple[str, ...]]:
    """What argv gains for the firmware and the TPM: -machine options, and the devices."""
    ovmf: Ovmf | None = ovmf_for(spec.firmware, OVMF_DIR)
    return machine_options(spec), platform_argv(spec, ovmf, nvram_path(spec, observed, disks_dir))


def missing_firmware_detail(observed: Observed) -> str:
    return "OVMF is not installed (Debian's ovmf package): " + ", ".join(observed.missing_firmware)


def adopt_tpm(observed: Observed) -> tuple[Action, ...]:
    """A live swtpm nobody watches (found after a controller restart) is attached."""
    tpm = observed.tpm
    return (AttachTpm(tpm.pid),) if tpm is not None and not tpm.watched else ()


def tpm_before_spawn(spec: QemuVMSpec, observed: Observed) -> tuple[Action, ...]:
    """A fresh swtpm for the QEMU about to start, or the end of one the spec no longer wants."""
    if spec.tpm is not None:
        return (StartTpm(spec.tpm.persistent),)
    return (StopTpm(),) if observed.tpm is not None else ()


def stray_tpm(observed: Observed) -> tuple[Action, ...]:
    """A swtpm without its QEMU serves nobody: it is ended."""
    return (StopTpm(),) if observed.tpm is not None and observed.process is None else ()


def lost_tpm(spec: QemuVMSpec, observed: Observed) -> str:
    """Why a running QEMU must restart for its TPM, or ""."""
    if spec.tpm is not None and observed.process is not None and observed.tpm is None:
        return "its swtpm is gone, so the guest lost its TPM: restarting"
    return ""
