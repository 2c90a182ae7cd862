"""Firmware and TPM: spec validation, argv, and the plan's steps for the NVRAM and swtpm. Pure."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import Any

import pytest
from pydantic import ValidationError

from api.spec_fields import describe_validation_error
from api.types import Accel, QemuVMSpec, QemuVMStatus, ReclaimPolicy
from controller.actions import (
    Action,
    AttachTpm,
    DeleteDisk,
    Finalize,
    PrepareNvram,
    RemoveRuntimeDir,
    RequestPowerdown,
    Spawn,
    StartTpm,
    StopTpm,
)
from controller.events import events_for
from controller.model import (
    Desired,
    DiskRecord,
    Memory,
    Observed,
    ProcessObservation,
    QmpState,
    TpmObservation,
)
from controller.plan import Intent, LaunchContext, Plan, plan
from controller.qemu.argv import LaunchInputs, RuntimePaths, argv_digest, build_argv
from controller.qemu.firmware import (
    NVRAM_NAME,
    OVMF_DIR,
    SECURE_NVRAM_NAME,
    swtpm_argv,
    tpm_paths,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
UID = "5d0c6f2e-8f5b-4c1e-9a34-2b7f0e1d6c58"
DISKS = PurePath("/data/disks") / UID
CONTEXT = LaunchContext(
    accel=Accel.TCG,
    runtime=RuntimePaths(PurePath("/data/run") / UID),
    images_dir=PurePath("/data/images"),
    disks_dir=DISKS,
)
NVRAM = DiskRecord(NVRAM_NAME, ReclaimPolicy.DELETE, exists=True, path=DISKS / NVRAM_NAME, size_mib=1)
UEFI = {"type": "uefi"}
SECURE = {"type": "uefi", "secureBoot": True}


def spec(**fields: Any) -> QemuVMSpec:
    return QemuVMSpec.model_validate({"memory": 256, "boot": {"kernel": "tiny-guest/vmlinuz"}, **fields})


def desired(*, deleting: bool = False, **fields: Any) -> Desired:
    return Desired(UID, "lab", "efi", 1, spec(**fields), None, deleting)


def observed(**fields: Any) -> Observed:
    return Observed(
        **{"process": None, "exit": None, "has_runtime_dir": True, "has_stale_runtime": False, **fields}
    )


def running(vm: Desired, *, qmp: QmpState = QmpState.RUNNING, **fields: Any) -> Observed:
    """`vm`'s QEMU running with the argv the plan would start it with now."""
    without_tpm = {key: value for key, value in fields.items() if key != "tpm"}
    probe = plan(vm, observed(**without_tpm), Memory(), CONTEXT, now=NOW)
    spawn = next(action for action in probe.actions if isinstance(action, Spawn))
    process = ProcessObservation(4242, spawn.digest, NOW - timedelta(minutes=5), qmp)
    return observed(process=process, **fields)


def decide(vm: Desired, seen: Observed) -> Plan:
    return plan(vm, seen, Memory(), CONTEXT, now=NOW)


def types_of(actions: tuple[Action, ...]) -> list[type]:
    return [type(action) for action in actions]


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"firmware": {"secureBoot": True}}, "spec: firmware.secureBoot needs firmware.type uefi"),
        (
            {"machine": "microvm", "firmware": SECURE},
            "spec: firmware.secureBoot needs machine q35 (SMM), not microvm",
        ),
        (
            {"machine": "microvm", "firmware": UEFI},
            "spec: firmware.type uefi needs machine q35: microvm has no flash for OVMF",
        ),
        ({"machine": "microvm", "tpm": {}}, "spec: tpm needs machine q35: microvm has no TPM interface"),
        (
            {"machine": "microvm", "firmware": SECURE, "tpm": {"persistent": True}},
            "spec: firmware.secureBoot needs machine q35 (SMM), not microvm;"
            " tpm needs machine q35: microvm has no TPM interface",
        ),
        ({"firmware": {"type": "coreboot"}}, "spec.firmware.type: Input should be 'bios' or 'uefi'"),
        ({"tpm": {"version": "1.2"}}, "spec.tpm.version: Extra inputs are not permitted"),
    ],
)
def test_impossible_combinations_are_named(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        spec(**fields)
    assert describe_validation_error(caught.value, prefix="spec") == message


def test_defaults_are_bios_without_a_tpm() -> None:
    vm = spec()
    assert (vm.firmware.type.value, vm.firmware.secure_boot, vm.firmware.reclaim_policy, vm.tpm) == (
        "bios",
        False,
        ReclaimPolicy.DELETE,
        None,
    )
    assert spec(firmware=SECURE, tpm={}).tpm is not None


# ---- argv -----------------------------------------------------------------------------------


def spawn_argv(vm: Desired, seen: Observed) -> tuple[str, ...]:
    spawn = next(action for action in decide(vm, seen).actions if isinstance(action, Spawn))
    return spawn.argv


def test_bios_argv_is_what_it_was_before_firmware_existed() -> None:
    """No running VM restarts on upgrade: a BIOS spec without a TPM gets the same argv."""
    vm = desired()
    inputs = LaunchInputs(
        uid=UID,
        name="efi",
        accel=Accel.TCG,
        runtime=CONTEXT.runtime,
        images_dir=CONTEXT.images_dir,
        disk_paths={},
        host_ports={},
    )
    assert vm.spec is not None
    assert spawn_argv(vm, observed()) == build_argv(vm.spec, inputs)
    assert not any("pflash" in argument or "tpm" in argument for argument in spawn_argv(vm, observed()))


def test_uefi_argv_has_ovmf_code_read_only_and_the_vms_own_vars() -> None:
    argv = spawn_argv(desired(firmware=UEFI), observed(disks={NVRAM_NAME: NVRAM}))
    assert argv[argv.index("-machine") + 1] == "q35"
    drives = [argv[i + 1] for i, argument in enumerate(argv) if argument == "-drive"]
    assert drives == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_DIR}/OVMF_CODE_4M.fd",
        f"if=pflash,format=raw,unit=1,file={DISKS}/{NVRAM_NAME}",
    ]
    assert "-global" not in argv


def test_secure_boot_argv_has_smm_a_secure_flash_and_the_enrolled_build() -> None:
    nvram = DiskRecord(SECURE_NVRAM_NAME, ReclaimPolicy.DELETE, exists=True, path=DISKS / SECURE_NVRAM_NAME)
    argv = spawn_argv(desired(firmware=SECURE), observed(disks={SECURE_NVRAM_NAME: nvram}))
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert argv[argv.index("-global") + 1] == "driver=cfi.pflash01,property=secure,value=on"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_DIR}/OVMF_CODE_4M.ms.fd" in argv


def test_an_nvram_path_with_a_comma_is_escaped() -> None:
    """A retained NVRAM keeps its path, under an operator-chosen data dir that may hold ','."""
    odd = DiskRecord(NVRAM_NAME, ReclaimPolicy.RETAIN, exists=True, path=PurePath("/srv/a,b/nvram.fd"))
    argv = spawn_argv(desired(firmware=UEFI), observed(disks={NVRAM_NAME: odd}))
    assert "if=pflash,format=raw,unit=1,file=/srv/a,,b/nvram.fd" in argv


def test_tpm_argv_reaches_swtpm_by_a_short_relative_socket_path() -> None:
    argv = spawn_argv(desired(tpm={}), observed())
    assert argv[argv.index("-tpmdev") + 1] == "emulator,id=tpm0,chardev=tpm0-ctrl"
    assert "socket,id=tpm0-ctrl,path=tpm/swtpm.sock" in argv
    assert "tpm-crb,tpmdev=tpm0" in argv
    assert tpm_paths(CONTEXT.runtime) == RuntimePaths(CONTEXT.runtime.directory / "tpm", program="swtpm")
    assert str(tpm_paths(CONTEXT.runtime).stderr_log).endswith("/tpm/swtpm.stderr")
    assert swtpm_argv()[:3] == ("swtpm", "socket", "--tpm2")
    assert "--terminate" in swtpm_argv()


# ---- plan -----------------------------------------------------------------------------------


def test_the_nvram_is_prepared_from_the_template_before_the_first_start() -> None:
    decided = decide(desired(firmware={**UEFI, "reclaimPolicy": "Retain"}), observed())
    assert decided.intent is Intent.PREPARING
    assert decided.actions == (
        PrepareNvram(
            NVRAM_NAME, OVMF_DIR / "OVMF_VARS_4M.fd", DISKS / NVRAM_NAME, ReclaimPolicy.RETAIN, "lab", "efi"
        ),
    )
    secure = decide(desired(firmware=SECURE), observed())
    assert secure.actions[0] == PrepareNvram(
        SECURE_NVRAM_NAME,
        OVMF_DIR / "OVMF_VARS_4M.ms.fd",
        DISKS / SECURE_NVRAM_NAME,
        ReclaimPolicy.DELETE,
        "lab",
        "efi",
    )


def test_an_existing_nvram_is_kept_and_the_vm_starts() -> None:
    decided = decide(desired(firmware=UEFI), observed(disks={NVRAM_NAME: NVRAM}))
    assert types_of(decided.actions) == [Spawn]


def test_turning_secure_boot_on_makes_a_vars_file_with_the_keys_and_releases_the_old_one() -> None:
    vm = desired(firmware=SECURE)
    prepared = decide(vm, observed(disks={NVRAM_NAME: NVRAM}))
    assert types_of(prepared.actions) == [PrepareNvram]
    secure = DiskRecord(SECURE_NVRAM_NAME, ReclaimPolicy.DELETE, exists=True, path=DISKS / SECURE_NVRAM_NAME)
    started = decide(vm, observed(disks={NVRAM_NAME: NVRAM, SECURE_NVRAM_NAME: secure}))
    assert started.actions[0] == DeleteDisk(NVRAM_NAME, NVRAM.path)
    assert isinstance(started.actions[-1], Spawn)


def test_back_to_bios_deletes_a_delete_nvram_and_keeps_a_retained_one() -> None:
    assert decide(desired(), observed(disks={NVRAM_NAME: NVRAM})).actions[0] == DeleteDisk(
        NVRAM_NAME, NVRAM.path
    )
    retained = DiskRecord(NVRAM_NAME, ReclaimPolicy.RETAIN, exists=True, path=NVRAM.path)
    assert types_of(decide(desired(), observed(disks={NVRAM_NAME: retained})).actions) == [Spawn]


def test_missing_ovmf_waits_with_a_reason_and_starts_nothing() -> None:
    missing = (str(OVMF_DIR / "OVMF_CODE_4M.fd"),)
    decided = decide(desired(firmware=UEFI), observed(missing_firmware=missing))
    assert (decided.intent, decided.reason, decided.actions) == (
        Intent.WAITING_FOR_IMAGES,
        "FirmwareNotFound",
        (),
    )
    assert "Debian's ovmf package" in decided.detail


def test_a_fresh_swtpm_is_started_right_before_qemu() -> None:
    decided = decide(desired(tpm={"persistent": True}), observed())
    assert decided.actions[-2:-1] == (StartTpm(persistent=True),)
    assert isinstance(decided.actions[-1], Spawn)
    # One left from a start that failed is replaced by the same action (it ends the old one).
    left = decide(desired(tpm={}), observed(tpm=TpmObservation(77)))
    assert types_of(left.actions)[-2:] == [StartTpm, Spawn]


def test_a_tpm_dropped_from_the_spec_ends_its_swtpm_before_qemu_starts() -> None:
    assert types_of(decide(desired(), observed(tpm=TpmObservation(77))).actions) == [StopTpm, Spawn]


def test_a_qemu_whose_swtpm_died_is_restarted_gracefully() -> None:
    vm = desired(tpm={})
    decided = decide(vm, running(vm))
    assert (decided.intent, decided.actions) == (Intent.RESTARTING, (RequestPowerdown(),))
    assert "lost its TPM" in decided.detail
    healthy = decide(vm, running(vm, tpm=TpmObservation(77)))
    assert (healthy.intent, healthy.actions) == (Intent.RUNNING, ())
    # A QEMU on its way out closes swtpm's socket first: its swtpm's end is not a lost TPM.
    leaving = decide(vm, running(vm, qmp=QmpState.SHUTDOWN))
    assert leaving.intent is Intent.RUNNING


def test_a_swtpm_found_after_a_controller_restart_is_adopted() -> None:
    vm = desired(tpm={})
    decided = decide(vm, running(vm, tpm=TpmObservation(77, watched=False)))
    assert (decided.intent, decided.actions, decided.again) == (Intent.ADOPTING, (AttachTpm(77),), True)


def test_a_halted_vm_ends_a_stray_swtpm() -> None:
    decided = decide(desired(tpm={}, runStrategy="Halted"), observed(tpm=TpmObservation(77)))
    assert (decided.intent, decided.actions) == (Intent.HALTED, (StopTpm(),))


def test_deletion_ends_swtpm_deletes_a_delete_nvram_and_keeps_a_retained_one() -> None:
    tpm = TpmObservation(77)
    decided = decide(
        desired(deleting=True, firmware=UEFI, tpm={}), observed(tpm=tpm, disks={NVRAM_NAME: NVRAM})
    )
    assert decided.actions == (StopTpm(), DeleteDisk(NVRAM_NAME, NVRAM.path), RemoveRuntimeDir())
    retained = DiskRecord(NVRAM_NAME, ReclaimPolicy.RETAIN, exists=True, path=NVRAM.path)
    kept = decide(
        desired(deleting=True, firmware=UEFI), observed(has_runtime_dir=False, disks={NVRAM_NAME: retained})
    )
    assert kept.actions == (Finalize(),)


def test_the_digest_changes_with_the_firmware_so_a_running_vm_restarts() -> None:
    bios = desired()
    uefi = desired(firmware=UEFI)
    bios_argv = spawn_argv(bios, observed())
    uefi_argv = spawn_argv(uefi, observed(disks={NVRAM_NAME: NVRAM}))
    assert argv_digest(bios_argv) != argv_digest(uefi_argv)
    decided = decide(uefi, running(bios, disks={NVRAM_NAME: NVRAM}))
    assert decided.intent is Intent.RESTARTING


def test_making_the_nvram_is_told_as_a_disk_event() -> None:
    vm = desired(firmware=UEFI)
    made = PrepareNvram(
        NVRAM_NAME, OVMF_DIR / "OVMF_VARS_4M.fd", DISKS / NVRAM_NAME, ReclaimPolicy.DELETE, "lab", "efi"
    )
    retained = replace(made, reclaim_policy=ReclaimPolicy.RETAIN)
    events = events_for(vm, QemuVMStatus(), QemuVMStatus(), (made, retained), None)
    assert [(event.reason, event.message) for event in events] == [
        ("DiskCreated", "NVRAM 'nvram.fd': a copy of OVMF_VARS_4M.fd"),
        (
            "DiskCreated",
            "NVRAM 'nvram.fd': the retained NVRAM of this VM name, or else a copy of OVMF_VARS_4M.fd",
        ),
    ]
