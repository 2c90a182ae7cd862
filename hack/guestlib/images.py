"""The guest's files: the tree (busybox, modules, /init), written reproducibly as a newc cpio
(the initramfs) and as an ext4 image (the root filesystem).
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

from guestlib.common import (
    EPOCH,
    IMAGE_NAME,
    PINNED_INODE_FIELDS,
    ROOTFS_LABEL,
    ROOTFS_SIZE,
    ROOTFS_UUID,
    BuildError,
    run,
    tool,
)
from guestlib.scripts import INIT, MARKER_CGI, UDHCPC_SCRIPT


def make_tree(tree: Path, *, kernel: Path, busybox: Path) -> None:
    """The userland shared by the initramfs and rootfs.raw."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "lib/modules/tofu", "proc", "sys", "dev"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    for d in ("run", "tmp", "newroot", "root"):
        (tree / d).mkdir()
    shutil.copy(busybox / "busybox", tree / "bin" / "busybox")
    applets = run([str(tree / "bin" / "busybox"), "--list-full"]).split()
    for applet in applets:
        if applet not in ("bin/busybox", "sbin/init", "linuxrc"):
            (tree / applet).symlink_to("/bin/busybox")
    write(tree / "init", INIT, 0o755)
    (tree / "sbin" / "init").symlink_to("/init")  # what the kernel runs from a disk root
    write(tree / "etc" / "udhcpc.script", UDHCPC_SCRIPT, 0o755)
    (tree / "usr" / "lib" / "tofu" / "cgi-bin").mkdir(parents=True)
    write(tree / "usr" / "lib" / "tofu" / "cgi-bin" / "marker", MARKER_CGI, 0o755)
    write(tree / "etc" / "hostname", IMAGE_NAME + "\n", 0o644)
    write(tree / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644)
    write(tree / "etc" / "group", "root:x:0:\n", 0o644)
    for module in (kernel / "modules").iterdir():
        shutil.copy(module, tree / "lib" / "modules" / "tofu" / module.name)
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)


def write(path: Path, text: str, mode: int) -> None:
    path.write_text(text)
    path.chmod(mode)


class NewcWriter:
    """A newc ("070701") cpio archive as the kernel unpacks it, every entry owned by 0:0."""

    def __init__(self, out: io.BufferedIOBase) -> None:
        self._out = out
        self._ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, EPOCH, len(data), 0, 0, *rdev, len(encoded), 0)
        self._out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._out.write(b"\0" * (-(110 + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            name = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                self.add(name, st.st_mode, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                self.add(name, st.st_mode)
            else:
                self.add(name, st.st_mode, path.read_bytes())

    def close(self) -> None:
        self.add("TRAILER!!!", 0)


def write_initramfs(tree: Path, dest: Path) -> None:
    with dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        cpio = NewcWriter(gz)
        cpio.add_tree(tree)
        # Device nodes need no privilege inside a cpio; the kernel opens /dev/console before
        # /init runs, and /init mounts devtmpfs over /dev.
        cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        cpio.add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
        cpio.add("etc/tofu-initramfs", stat.S_IFREG | 0o644, b"this root is the initramfs\n")
        cpio.close()


def write_rootfs(tree: Path, dest: Path) -> None:
    """ext4 from the tree with `mke2fs -d`, then a `debugfs` pass (neither needs root) that adds
    the console node and pins what mke2fs copies from the host: owners (the builder may not be
    root) and inode times (ctime cannot be set with utime). The same packages give the same image."""
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(EPOCH))
    dest.unlink(missing_ok=True)
    run(
        [
            tool("mke2fs"), "-q", "-F", "-t", "ext4", "-L", ROOTFS_LABEL, "-m", "0", "-U", str(ROOTFS_UUID),
            "-E", f"root_owner=0:0,hash_seed={ROOTFS_UUID}", "-d", str(tree), str(dest), ROOTFS_SIZE,
        ],
        env=env,
    )  # fmt: skip
    paths = ["/", "/lost+found", *sorted("/" + p.relative_to(tree).as_posix() for p in tree.rglob("*"))]
    commands = [
        "cd /dev",
        "mknod console c 5 1",  # the kernel opens it before /init mounts devtmpfs
        "sif /dev/console mode 020600",
        *(
            f"sif {path} {field} {value}"
            for path in [*paths, "/dev/console"]
            for field, value in PINNED_INODE_FIELDS
        ),
    ]
    script = dest.with_name("debugfs.cmds")
    script.write_text("\n".join(commands) + "\n")
    proc = subprocess.run(
        [tool("debugfs"), "-w", "-f", str(script), str(dest)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    script.unlink()
    # debugfs exits 0 even when a command fails; it reports failures on stderr after its banner.
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise BuildError("debugfs failed on rootfs.raw:\n" + "\n".join(errors[:10]))
