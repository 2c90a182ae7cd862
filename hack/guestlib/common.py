"""What every step of hack/build-guest shares: the image's fixed names and pins, and running a
tool with its failure turned into a BuildError.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_NAME = "tiny-guest"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# What the guest needs. Their dependencies are added from each module's `depends=` field, since
# the .deb ships no modules.dep. Ties in the load order follow this list (docs/guest.md#how-it-is-built).
# The cloud-init seed CD-ROM sits on virtio-scsi: the cloud kernel has no AHCI driver at all
# (CONFIG_SATA_AHCI is not set), so q35's built-in ICH9 controller is invisible to it.
ROOT_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sr_mod",
    "isofs",
    "button",
    "evdev",
    "virtio_console",  # the guest agent's virtio-serial port (docs/guest-agent.md)
)
KNOWN_ORDER = (
    "failover",
    "net_failover",
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "scsi_common",
    "scsi_mod",
    "virtio_scsi",
    "cdrom",
    "sr_mod",
    "isofs",
    "button",
    "evdev",
    "virtio_console",
)
OUTPUTS = ("vmlinuz", "initramfs.cpio.gz", "rootfs.raw")
ROOTFS_SIZE = "32M"
ROOTFS_LABEL = "tofu-root"
# Fixed file times, owners and filesystem ids: the same packages give byte-identical outputs.
EPOCH = 1_700_000_000
PINNED_INODE_FIELDS = (
    ("uid", "0"),
    ("gid", "0"),
    *((field, f"@{EPOCH}") for field in ("atime", "ctime", "mtime", "crtime")),
)
ROOTFS_UUID = uuid.uuid5(uuid.NAMESPACE_URL, "https://tofu-qemu/tiny-guest/rootfs")
APT_LISTS = Path("/var/lib/apt/lists")
APT_CONFIG = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"), Path("/etc/apt/preferences.d"))
MODULE_RE = re.compile(r"^\.?/?(?:usr/)?lib/modules/([^/]+)/kernel/.*/([^/]+)\.ko(\.xz|\.zst|\.gz)?$")
VMLINUZ_RE = re.compile(r"^\.?/?boot/vmlinuz-(.+)$")
CMDLINES = {
    "initramfs": "console=ttyS0 panic=-1 tofu.name=NAME",
    "disk-virtio": "console=ttyS0 panic=-1 root=/dev/vda tofu.name=NAME",
    "disk-nvme": "console=ttyS0 panic=-1 root=/dev/nvme0n1 rw devtmpfs.mount=1 tofu.name=NAME",
}


class BuildError(Exception):
    """A build step failed in a way the user has to fix (the message says how)."""


def log(message: str) -> None:
    print(f"build-guest: {message}", file=sys.stderr, flush=True)


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a command; raise BuildError with its stderr when it fails."""
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tool(name: str) -> str:
    """The absolute path of a host tool, or a BuildError naming it."""
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} is not installed (apt-get, dpkg-deb, mke2fs and qemu come from Debian)")
    return path


def as_root(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return argv
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True, check=False).returncode == 0:
        return [sudo, "-n", *argv]
    raise BuildError(
        f"`{' '.join(argv)}` needs root: run as root, allow passwordless sudo, or run it yourself first"
    )
