"""The QEMU argv: complete, deterministic, and impossible to extend with an extra option."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import pytest

from api.types import Accel, Protocol, QemuVMSpec
from controller.qemu.argv import (
    LaunchInputs,
    RuntimePaths,
    UnsafeValue,
    argv_digest,
    build_argv,
    disk_serial,
    mac_address,
    option_value,
)

UID = "6f1c1d1e-4c5b-4d59-9f40-0d4b0a6c1e11"


def inputs(data_dir: str = "/data", **overrides: Any) -> LaunchInputs:
    base: dict[str, Any] = {
        "uid": UID,
        "name": "web",
        "accel": Accel.TCG,
        "runtime": RuntimePaths(PurePath(data_dir) / "run" / UID),
        "images_dir": PurePath(data_dir) / "images",
        "disk_paths": {"root": PurePath(data_dir) / "disks" / UID / "root.qcow2"},
        "host_ports": {(Protocol.TCP, 80): 20080},
    }
    base.update(overrides)
    return LaunchInputs(**base)


def spec(**fields: Any) -> QemuVMSpec:
    raw: dict[str, Any] = {
        "cpus": 2,
        "memory": "1Gi",
        "boot": {"kernel": "tiny/vmlinuz", "initrd": "tiny/initrd.gz", "cmdline": "quiet"},
        "disks": [{"name": "root", "image": "base.raw"}],
        "network": {"forwards": [{"guestPort": 80}]},
    }
    raw.update(fields)
    return QemuVMSpec.model_validate(raw)


def options(argv: tuple[str, ...]) -> list[str]:
    return [arg for arg in argv if arg.startswith("-")]


def test_argv_has_the_expected_shape() -> None:
    """Resources, paths, QMP, serial, disks and forwards all appear where QEMU expects them."""
    argv = build_argv(spec(), inputs())
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64"
    assert "-S" in argv
    assert "-smp 2 -m 1024M" in joined
    assert "-machine q35 -accel tcg" in joined
    assert f"-pidfile /data/run/{UID}/qemu.pid" in joined
    assert "socket,id=qmp,path=qmp.sock,server=on,wait=off" in argv
    assert f"socket,id=serial0,path=serial.sock,server=on,wait=off,logfile=/data/run/{UID}/serial.log" in argv
    assert "-kernel /data/images/tiny/vmlinuz -initrd /data/images/tiny/initrd.gz" in joined
    assert argv[argv.index("-append") + 1] == "console=ttyS0 tofu.name=web quiet"
    assert (
        f"driver=qcow2,node-name=disk-root,file.driver=file,file.filename=/data/disks/{UID}/root.qcow2"
        in argv
    )
    assert "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:20080-:80" in argv
    assert f"virtio-net-pci,netdev=net0,mac={mac_address(UID)}" in argv


def test_argv_is_deterministic() -> None:
    """The same inputs give the same argv and digest (adoption compares digests)."""
    assert argv_digest(build_argv(spec(), inputs())) == argv_digest(build_argv(spec(), inputs()))


@pytest.mark.parametrize(
    ("change", "differs"),
    [
        pytest.param({"memory": 2048}, True, id="memory"),
        pytest.param({"cpus": 1}, True, id="cpus"),
        pytest.param({"network": {"forwards": [{"guestPort": 22}]}}, True, id="forwards"),
        pytest.param({"stopTimeout": 99}, False, id="stop-timeout-needs-no-restart"),
        pytest.param({"runStrategy": "RerunOnFailure"}, False, id="run-strategy-needs-no-restart"),
    ],
)
def test_digest_changes_exactly_with_restart_fields(change: dict[str, Any], differs: bool) -> None:
    """Only fields that need a restart change the argv digest."""
    ports = {(Protocol.TCP, 80): 20080, (Protocol.TCP, 22): 20022}
    before = argv_digest(build_argv(spec(), inputs(host_ports=ports)))
    after = argv_digest(build_argv(spec(**change), inputs(host_ports=ports)))
    assert (before != after) is differs


def test_identity_derives_from_uid() -> None:
    """MAC, SMBIOS UUID and disk serials are stable per uid and differ between uids."""
    argv = build_argv(spec(), inputs())
    assert argv[argv.index("-uuid") + 1] == UID
    assert mac_address(UID) == mac_address(UID) != mac_address("other")
    assert mac_address(UID).startswith("52:54:00:")
    assert f"serial={disk_serial(UID, 'root')}" in " ".join(argv)
    assert len(disk_serial(UID, "root")) == 20


@pytest.mark.parametrize(
    "data_dir",
    [
        pytest.param("/data,readonly=on", id="comma"),
        pytest.param("/data=x", id="equals"),
        pytest.param("/my data;rm -rf", id="space-semicolon"),
        pytest.param("/d" + "x" * 3000, id="very-long"),
    ],
)
def test_hostile_data_dir_never_adds_an_option(data_dir: str) -> None:
    """Commas in operator paths are doubled, and no value becomes an extra option or key."""
    argv = build_argv(spec(), inputs(data_dir))
    assert options(argv) == options(build_argv(spec(), inputs()))
    serial = next(arg for arg in argv if arg.startswith("socket,id=serial0"))
    assert serial.replace(",,", "").count(",") == 5
    if "," in data_dir:
        assert data_dir.replace(",", ",,") in serial


@pytest.mark.parametrize("value", ["a\nb", "a\x00b", "\x1b[2J"])
def test_control_characters_are_refused(value: str) -> None:
    """No escaping can make a control character safe inside an option string."""
    with pytest.raises(UnsafeValue):
        option_value(value)


def test_data_dir_starting_with_dash_is_refused() -> None:
    """A relative data dir like '-x' would turn -pidfile's value into an option."""
    with pytest.raises(UnsafeValue, match="read as a QEMU option"):
        build_argv(spec(), inputs("-x"))


def test_kernel_cmdline_is_one_argument() -> None:
    """A cmdline with spaces and '=' stays a single -append value."""
    argv = build_argv(spec(boot={"kernel": "k", "cmdline": "a=b -hda /etc/passwd, x"}), inputs())
    assert argv[argv.index("-append") + 1] == "console=ttyS0 tofu.name=web a=b -hda /etc/passwd, x"
    assert "-hda" not in argv


def test_microvm_uses_mmio_devices() -> None:
    """microvm has no PCI bus: virtio devices are the -device (mmio) variants."""
    argv = " ".join(build_argv(spec(machine="microvm"), inputs()))
    assert "virtio-net-device" in argv
    assert "virtio-blk-device" in argv
    assert "-pci" not in argv


def test_unresolved_accelerator_is_refused() -> None:
    """`auto` must be probed before a command line is built."""
    with pytest.raises(ValueError, match="must be resolved"):
        build_argv(spec(), inputs(accel=Accel.AUTO))


def test_forwards_listen_on_the_configured_address() -> None:
    """In a container forwards listen on 0.0.0.0 so `-p` can publish them; loopback otherwise."""
    default = " ".join(build_argv(spec(), inputs()))
    published = " ".join(build_argv(spec(), inputs(forward_address="0.0.0.0")))  # noqa: S104 - the point
    assert "hostfwd=tcp:127.0.0.1:20080-:80" in default
    assert "hostfwd=tcp:0.0.0.0:20080-:80" in published


@pytest.mark.parametrize(
    ("machine", "controller"),
    [("q35", "virtio-scsi-pci,id=seed-scsi"), ("microvm", "virtio-scsi-device,id=seed-scsi")],
)
def test_cloud_init_seed_is_a_read_only_cd_rom(machine: str, controller: str) -> None:
    """A SCSI CD-ROM on its own controller (not a second virtio disk); never writable."""
    seed = PurePath("/data,x/run") / UID / "cidata-0123abcd.iso"
    argv = build_argv(spec(machine=machine), inputs(seed_path=seed))
    blockdev = argv[argv.index("-blockdev", argv.index("-blockdev") + 1) + 1]
    assert blockdev == (
        "driver=raw,node-name=cidata,read-only=on,file.driver=file,"
        f"file.filename=/data,,x/run/{UID}/cidata-0123abcd.iso"
    )
    at = argv.index(blockdev)
    assert argv[at + 1 : at + 5] == ("-device", controller, "-device", "scsi-cd,drive=cidata,bus=seed-scsi.0")
    assert "cidata" not in " ".join(build_argv(spec(machine=machine), inputs()))
