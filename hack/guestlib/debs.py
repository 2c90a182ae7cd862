"""The Debian packages the guest is made of: resolving and downloading them with apt, and
unpacking the kernel, its needed modules (with their load order) and busybox.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestlib.agent import AGENT_PACKAGE, apt_show, resolve_agent
from guestlib.common import (
    APT_CONFIG,
    APT_LISTS,
    BUSYBOX_PACKAGE,
    KERNEL_METAPACKAGE,
    KNOWN_ORDER,
    MODULE_RE,
    ROOT_MODULES,
    VMLINUZ_RE,
    BuildError,
    as_root,
    log,
    run,
    tool,
)


@dataclass(frozen=True, slots=True)
class Package:
    name: str
    version: str

    @property
    def deb_name(self) -> str:
        """The file name `apt-get download` gives this package."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"

    def as_json(self) -> dict[str, str]:
        return {"package": self.name, "version": self.version}


@dataclass(frozen=True, slots=True)
class Packages:
    kernel: Package
    busybox: Package
    # qemu-guest-agent first, then the library packages it may load (guestlib/agent.py).
    agent: tuple[Package, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel.as_json(),
            "busybox": self.busybox.as_json(),
            "agent": [p.as_json() for p in self.agent],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Packages:
        return cls(
            kernel=Package(data["kernel"]["package"], data["kernel"]["version"]),
            busybox=Package(data["busybox"]["package"], data["busybox"]["version"]),
            agent=tuple(Package(p["package"], p["version"]) for p in data.get("agent", ())),
        )

    @property
    def every(self) -> list[Package]:
        return [self.kernel, self.busybox, *self.agent]


def apt_fingerprint() -> str:
    """Identify the apt state that decides package versions, without running apt (which is slow)."""
    entries: list[str] = []
    paths: list[Path] = [p for p in APT_LISTS.glob("*") if p.is_file() and p.name != "lock"]
    for config in APT_CONFIG:
        paths.extend(sorted(config.glob("*")) if config.is_dir() else [config])
    for path in sorted(paths):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        entries.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def apt_update() -> None:
    log("apt-get update")
    run(as_root([tool("apt-get"), "-o", "DPkg::Lock::Timeout=300", "-qq", "update"]))


def resolve_packages() -> Packages | None:
    """The candidate versions apt knows, or None when apt knows nothing about the packages."""
    stanzas = apt_show([KERNEL_METAPACKAGE, BUSYBOX_PACKAGE])
    meta, busybox = stanzas.get(KERNEL_METAPACKAGE), stanzas.get(BUSYBOX_PACKAGE)
    if meta is None or busybox is None:
        return None
    # Like `apt-cache depends`: the metapackage depends on exactly one concrete kernel package,
    # built from the same source, pinned as "linux-image-6.1.0-NN-cloud-amd64 (= VERSION)".
    for dependency in meta.get("Depends", "").split(","):
        match = re.fullmatch(r"\s*(linux-image-[^\s(]+)\s*(?:\(=\s*([^)\s]+)\s*\))?\s*", dependency)
        if match:
            kernel = Package(match[1], match[2] or meta["Version"])
            busybox_package = Package(BUSYBOX_PACKAGE, busybox["Version"])
            return Packages(kernel=kernel, busybox=busybox_package, agent=agent_packages())
    raise BuildError(f"{KERNEL_METAPACKAGE} {meta['Version']} depends on no linux-image package")


def agent_packages() -> tuple[Package, ...]:
    """qemu-guest-agent first, then its library packages in name order."""
    resolved = resolve_agent()
    if resolved is None:
        raise BuildError(f"apt knows no {AGENT_PACKAGE}")
    packages = [Package(name, version) for name, version in resolved]
    return tuple(sorted(packages, key=lambda p: (p.name != AGENT_PACKAGE, p.name)))


def download(packages: Iterable[Package], debs: Path) -> None:
    """Download the .debs that are not in `debs` yet, with apt's own hash checks."""
    missing = [p for p in packages if not (debs / p.deb_name).is_file()]
    if not missing:
        return
    log("apt-get download " + " ".join(f"{p.name}={p.version}" for p in missing))
    staging = debs / ".download"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # As root, apt drops to the _apt user to download, which cannot write into our cache dir.
    sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    wanted = [f"{p.name}={p.version}" for p in missing]
    run([tool("apt-get"), *sandbox, "-qq", "download", *wanted], cwd=staging)
    for package in missing:
        deb = str(staging / package.deb_name)
        fields = run([tool("dpkg-deb"), "--show", "--showformat=${Package} ${Version}", deb]).split()
        if fields != [package.name, package.version]:
            raise BuildError(f"{package.deb_name} holds {fields}, not {package}")
        os.replace(staging / package.deb_name, debs / package.deb_name)
    shutil.rmtree(staging, ignore_errors=True)


def deb_members(deb: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Stream the members of a .deb's data archive (any compression dpkg-deb knows)."""
    proc = subprocess.Popen([tool("dpkg-deb"), "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                yield member, tar
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def decompress_module(data: bytes, suffix: str) -> bytes:
    """busybox insmod may not read compressed modules, so store them plain."""
    if suffix == ".xz":
        return lzma.decompress(data)
    if suffix == ".gz":
        return gzip.decompress(data)
    if suffix == ".zst":
        return subprocess.run([tool("zstd"), "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def module_depends(data: bytes) -> list[str]:
    """The `depends=` entry of a module's .modinfo section."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [d for d in match[1].decode().split(",") if d] if match else []


def unpack_kernel(deb: Path, dest: Path) -> None:
    """Unpack the bzImage and the modules the guest needs (with dependencies) into `dest`."""
    wanted = set(KNOWN_ORDER) | set(ROOT_MODULES)
    modules: dict[str, bytes] = {}
    release = ""
    while True:
        for member, tar in deb_members(deb):
            if not member.isfile():
                continue
            if match := VMLINUZ_RE.match(member.name):
                release = match[1]
                (dest / "vmlinuz").write_bytes(read_member(tar, member))
            elif (match := MODULE_RE.match(member.name)) and match[2] in wanted - modules.keys():
                modules[match[2]] = decompress_module(read_member(tar, member), match[3] or "")
        needed = closure(ROOT_MODULES, modules)
        missing = needed - modules.keys()
        if not missing:
            break
        if missing <= wanted:
            raise BuildError(f"{deb.name} has no module(s) {sorted(missing)}")
        wanted |= missing  # a dependency we did not expect: one more pass over the archive
    if not release:
        raise BuildError(f"{deb.name} has no boot/vmlinuz-*")
    (dest / "modules").mkdir()
    for name in needed:
        (dest / "modules" / f"{name}.ko").write_bytes(modules[name])
    (dest / "modules" / "order").write_text("\n".join(load_order(needed, modules)) + "\n")
    (dest / "release").write_text(release + "\n")


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None
    return f.read()


def closure(roots: Iterable[str], modules: dict[str, bytes]) -> set[str]:
    """The roots plus everything they depend on, as far as the modules read so far tell."""
    needed: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(module_depends(modules[name]) if name in modules else [])
    return needed


def load_order(needed: set[str], modules: dict[str, bytes]) -> list[str]:
    """A dependency-first order; ties follow KNOWN_ORDER, then the name."""
    rank = {name: i for i, name in enumerate(KNOWN_ORDER)}
    order: list[str] = []
    pending = sorted(needed, key=lambda n: (rank.get(n, len(rank)), n))
    while pending:
        ready = next(n for n in pending if set(module_depends(modules[n])) <= set(order))
        order.append(ready)
        pending.remove(ready)
    return order


def unpack_busybox(deb: Path, dest: Path) -> None:
    for member, tar in deb_members(deb):
        if member.isfile() and member.name.lstrip("./") == "bin/busybox":
            (dest / "busybox").write_bytes(read_member(tar, member))
            (dest / "busybox").chmod(0o755)
            return
    raise BuildError(f"{deb.name} has no bin/busybox")


def unpacked(deb: Path, cache: Path, unpack: Callable[[Path, Path], None], *, selection: str = "") -> Path:
    """Unpack each .deb once: the result is kept in cache/unpacked/<deb name>/. `selection` names
    what was kept (the module list): when it changes, the .deb is unpacked again."""
    dest = cache / "unpacked" / deb.stem
    complete = dest / ".complete"
    if complete.exists() and complete.read_text() == selection:
        return dest
    log(f"unpacking {deb.name}")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    unpack(deb, dest)
    complete.write_text(selection)
    return dest
