"""qemu-ga in the guest: Debian's `qemu-guest-agent` and the shared libraries it loads.

The packages to download are the agent plus the closure of its `Depends` over Debian's `libs`
section (the shared libraries; perl, dpkg and the like are never followed). What the guest gets
is narrower: only the files the dynamic loader will map, found by reading each ELF's
`DT_NEEDED` entries, starting from qemu-ga. The files keep their Debian paths, so the loader's
built-in multiarch search path finds them without an ld.so.cache.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path, PurePosixPath

from guestlib.common import EPOCH, BuildError, tool

AGENT_PACKAGE = "qemu-guest-agent"
AGENT_BINARY = PurePosixPath("usr/sbin/qemu-ga")
LIBRARY_SECTION = "libs"
# Where Debian's x86_64 loader looks when there is no ld.so.cache (multiarch first).
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
# The loader named by every binary's PT_INTERP on x86_64 (a symlink into lib/x86_64-linux-gnu).
LOADER = PurePosixPath("lib64/ld-linux-x86-64.so.2")
# Guards against a bad package: no guest needs more than this many libraries for one daemon.
LIBRARIES_MAX = 64

_PT_DYNAMIC = 2
_PT_LOAD = 1
_DT_NEEDED = 1
_DT_STRTAB = 5


def apt_show(names: list[str]) -> dict[str, dict[str, str]]:
    """The candidate stanza of each package apt knows, by name (one `apt-cache show` call)."""
    proc = subprocess.run(
        [tool("apt-cache"), "show", "--no-all-versions", *names],
        capture_output=True,
        text=True,
        check=False,
    )
    stanzas: dict[str, dict[str, str]] = {}
    for block in proc.stdout.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if ": " in line and not line[0].isspace()
        )
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], fields)
    return stanzas


def depends_names(fields: dict[str, str]) -> list[str]:
    """Package names of Pre-Depends and Depends; of alternatives (`a | b`) the first, as apt does."""
    names = []
    for key in ("Pre-Depends", "Depends"):
        for dependency in filter(None, (d.strip() for d in fields.get(key, "").split(","))):
            first = dependency.split("|")[0].strip()
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def resolve_agent() -> list[tuple[str, str]] | None:
    """(package, version) of qemu-guest-agent and its shared-library dependencies, sorted; None
    when apt knows no qemu-guest-agent. Two apt calls (each takes seconds without apt's binary
    cache): every package reachable, then their stanzas; the closure is computed here."""
    stanzas = apt_show(reachable(AGENT_PACKAGE))
    if AGENT_PACKAGE not in stanzas:
        return None
    found: dict[str, str] = {}
    todo = [AGENT_PACKAGE]
    while todo:
        name = todo.pop()
        fields = stanzas.get(name)
        # Follow only the libraries section: the agent's runtime is its shared libraries.
        library = fields is not None and fields.get("Section") == LIBRARY_SECTION
        if name in found or fields is None or (name != AGENT_PACKAGE and not library):
            continue
        found[name] = fields["Version"]
        todo += depends_names(fields)
    return sorted(found.items())


def reachable(package: str) -> list[str]:
    """Every real package apt could pull in through (Pre-)Depends, `package` first."""
    proc = subprocess.run(
        [
            tool("apt-cache"), "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
            "--no-breaks", "--no-replaces", "--no-enhances", package,
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    names = [line for line in proc.stdout.splitlines() if line and not line[0].isspace() and "<" not in line]
    return names or [package]


def unpack_agent(debs: list[Path], dest: Path) -> None:
    """Unpack every .deb into a scratch dir, then keep qemu-ga, the loader and the libraries it
    needs (transitively) under dest/root/, at their Debian paths."""
    scratch = dest / "all"
    scratch.mkdir()
    for deb in debs:
        subprocess.run([tool("dpkg-deb"), "-x", str(deb), str(scratch)], check=True, capture_output=True)
    root = dest / "root"
    for path in sorted(needed_files(scratch)):
        copy_preserving(scratch, root, path)
    shutil.rmtree(scratch)


def needed_files(scratch: Path) -> set[PurePosixPath]:
    """qemu-ga, the loader, and each library its DT_NEEDED closure names, with the symlinks that
    lead to them (as paths relative to `scratch`)."""
    if not (scratch / AGENT_BINARY).is_file():
        raise BuildError(f"{AGENT_PACKAGE} has no {AGENT_BINARY}")
    files = {AGENT_BINARY, *symlink_chain(scratch, LOADER)}
    todo = [AGENT_BINARY]
    seen: set[str] = set()
    while todo:
        for soname in elf_needed((scratch / todo.pop()).read_bytes()):
            if soname in seen:
                continue
            seen.add(soname)
            if len(seen) > LIBRARIES_MAX:
                raise BuildError(f"qemu-ga needs more than {LIBRARIES_MAX} libraries")
            chain = find_library(scratch, soname)
            files.update(chain)
            todo.append(chain[-1])
    return files


def find_library(scratch: Path, soname: str) -> list[PurePosixPath]:
    for directory in LIBRARY_DIRS:
        candidate = PurePosixPath(directory) / soname
        if os.path.lexists(scratch / candidate):
            return symlink_chain(scratch, candidate)
    raise BuildError(f"qemu-ga needs {soname}, which no downloaded library package ships")


def symlink_chain(scratch: Path, path: PurePosixPath) -> list[PurePosixPath]:
    """`path` and every symlink hop after it, ending at a regular file (all inside scratch)."""
    chain = [path]
    while (scratch / chain[-1]).is_symlink():
        target = PurePosixPath(os.readlink(scratch / chain[-1]))
        following = target if target.is_absolute() else chain[-1].parent / target
        hop = PurePosixPath(os.path.normpath("/" / following)).relative_to("/")
        if hop in chain or len(chain) > 8:
            raise BuildError(f"symlink loop at {path}")
        chain.append(hop)
    if not (scratch / chain[-1]).is_file():
        raise BuildError(f"{path} leads to {chain[-1]}, which is not in the packages")
    return chain


def copy_preserving(scratch: Path, root: Path, path: PurePosixPath) -> None:
    source, target = scratch / path, root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        target.symlink_to(os.readlink(source))
    else:
        shutil.copy2(source, target)


def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED names of a little-endian ELF64 file (what the loader will look up)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError("not a little-endian 64-bit ELF file")
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        header = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        p_type, offset, vaddr, filesz = header[0], header[2], header[3], header[5]
        if p_type == _PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return []  # static
    entries = [struct.unpack_from("<qQ", data, dynamic[0] + i) for i in range(0, dynamic[1], 16)]
    strtab_vaddr = next(value for tag, value in entries if tag == _DT_STRTAB)
    strtab = next(
        offset + strtab_vaddr - vaddr for vaddr, offset, size in loads if vaddr <= strtab_vaddr < vaddr + size
    )
    names = []
    for tag, value in entries:
        if tag == _DT_NEEDED:
            end = data.index(b"\0", strtab + value)
            names.append(data[strtab + value : end].decode())
    return names


# qemu-ga's guest-shutdown runs `/sbin/shutdown -h -P|-H|-r +0 MESSAGE` with stdout on
# /dev/null; busybox has no `shutdown`, so this one stands in and says on the console who asked.
SHUTDOWN_SCRIPT = r"""#!/bin/sh
# /sbin/shutdown for qemu-ga's guest-shutdown (docs/guest-agent.md).
action=poweroff
for arg in "$@"; do
    case $arg in -r) action=reboot ;; -H) action=halt ;; esac
done
echo "TOFU-GUEST-POWEROFF name=$(hostname) via=guest-agent action=$action" >/dev/console
sync
"$action" -f
"""
OS_RELEASE = """PRETTY_NAME="tofu-qemu tiny guest"
NAME="tofu-qemu tiny guest"
ID=tofu-tiny-guest
ID_LIKE=debian
VERSION_ID=1
"""


def add_agent(tree: Path, agent_root: Path) -> None:
    """qemu-ga and its libraries into the guest tree, plus what its commands read or run."""
    shutil.copytree(agent_root, tree, symlinks=True, dirs_exist_ok=True)
    shutdown = tree / "sbin" / "shutdown"
    shutdown.unlink(missing_ok=True)
    shutdown.write_text(SHUTDOWN_SCRIPT)
    shutdown.chmod(0o755)
    (tree / "etc" / "os-release").write_text(OS_RELEASE)  # guest-get-osinfo
    (tree / "etc" / "os-release").chmod(0o644)
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)
