"""hack/guestlib/agent.py: which packages qemu-ga needs, and which of their files the guest keeps
(read from the ELF files themselves, not from a list)."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def agent() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO_ROOT / "hack"))
    try:
        from guestlib import agent

        yield agent
    finally:
        sys.path.remove(str(REPO_ROOT / "hack"))


def fake_elf(needed: list[str]) -> bytes:
    """A minimal little-endian ELF64 with one PT_LOAD and a PT_DYNAMIC naming `needed`."""
    strtab = b"\0" + b"".join(name.encode() + b"\0" for name in needed)
    offsets = [1 + sum(len(n) + 1 for n in needed[:i]) for i in range(len(needed))]
    dynamic = b"".join(struct.pack("<qQ", 1, offset) for offset in offsets)
    header_size, phentsize = 64, 56
    dyn_offset = header_size + 2 * phentsize
    str_offset = dyn_offset + len(dynamic) + 32
    vaddr_base = 0x400000
    dynamic += struct.pack("<qQ", 5, vaddr_base + str_offset) + struct.pack("<qQ", 0, 0)
    total = str_offset + len(strtab)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, header_size, 0, 0, 64, phentsize, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr_base, vaddr_base, total, total, 0x1000)
    size = len(dynamic)
    dyn = struct.pack("<IIQQQQQQ", 2, 6, dyn_offset, vaddr_base + dyn_offset, 0, size, size, 8)
    return header + load + dyn + dynamic + strtab


def test_elf_needed_reads_the_dynamic_section(agent: ModuleType) -> None:
    assert agent.elf_needed(fake_elf(["libglib-2.0.so.0", "libc.so.6"])) == ["libglib-2.0.so.0", "libc.so.6"]
    with pytest.raises(agent.BuildError):
        agent.elf_needed(b"#!/bin/sh\n" + b"\0" * 64)


def test_the_closure_keeps_needed_libraries_and_symlinks_only(agent: ModuleType, tmp_path: Path) -> None:
    def put(path: str, data: bytes = b"", link: str = "") -> None:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            target.symlink_to(link)
        else:
            target.write_bytes(data)

    put("usr/sbin/qemu-ga", fake_elf(["libglib-2.0.so.0", "libc.so.6"]))
    put("usr/lib/x86_64-linux-gnu/libglib-2.0.so.0", link="libglib-2.0.so.0.7400.6")
    put("usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6", fake_elf(["libpcre2-8.so.0", "libc.so.6"]))
    put("usr/lib/x86_64-linux-gnu/libpcre2-8.so.0", fake_elf(["libc.so.6"]))
    put("usr/lib/x86_64-linux-gnu/libunused.so.1", fake_elf([]))
    put("lib/x86_64-linux-gnu/libc.so.6", fake_elf([]))
    put("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", fake_elf([]))
    put("lib64/ld-linux-x86-64.so.2", link="/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")

    assert agent.needed_files(tmp_path) == {
        PurePosixPath(p)
        for p in (
            "usr/sbin/qemu-ga",
            "usr/lib/x86_64-linux-gnu/libglib-2.0.so.0",
            "usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6",
            "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0",
            "lib/x86_64-linux-gnu/libc.so.6",
            "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "lib64/ld-linux-x86-64.so.2",
        )
    }
    (tmp_path / "usr/lib/x86_64-linux-gnu/libpcre2-8.so.0").unlink()
    with pytest.raises(agent.BuildError, match=r"libpcre2-8\.so\.0"):
        agent.needed_files(tmp_path)


def test_depends_take_the_first_alternative_and_drop_versions(agent: ModuleType) -> None:
    fields = {
        "Pre-Depends": "init-system-helpers (>= 1.54~)",
        "Depends": "libc6 (>= 2.34), libglib2.0-0 (>= 2.63.3), libfoo1:any | libbar1",
    }
    assert agent.depends_names(fields) == ["init-system-helpers", "libc6", "libglib2.0-0", "libfoo1"]


def test_resolution_follows_only_the_libraries_section(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu-guest-agent's Pre-Depends (init-system-helpers, which pulls perl) are not followed;
    the libraries' own dependencies are."""
    stanzas = {
        "qemu-guest-agent": {
            "Version": "1:7.2",
            "Section": "admin",
            "Pre-Depends": "init-system-helpers",
            "Depends": "libc6, libglib2.0-0",
        },
        "init-system-helpers": {"Version": "1.65", "Section": "admin", "Depends": "perl-base"},
        "perl-base": {"Version": "5.36", "Section": "perl"},
        "libc6": {"Version": "2.36", "Section": "libs", "Depends": "libgcc-s1"},
        "libgcc-s1": {"Version": "12.2", "Section": "libs"},
        "libglib2.0-0": {"Version": "2.74", "Section": "libs", "Depends": "libc6, libpcre2-8-0 | libpcre3"},
        "libpcre2-8-0": {"Version": "10.42", "Section": "libs"},
    }
    monkeypatch.setattr(agent, "reachable", lambda _package: list(stanzas))
    monkeypatch.setattr(agent, "apt_show", lambda names: {n: {"Package": n, **stanzas[n]} for n in names})
    assert agent.resolve_agent() == [
        ("libc6", "2.36"),
        ("libgcc-s1", "12.2"),
        ("libglib2.0-0", "2.74"),
        ("libpcre2-8-0", "10.42"),
        ("qemu-guest-agent", "1:7.2"),
    ]
    monkeypatch.setattr(agent, "apt_show", lambda _names: {})
    assert agent.resolve_agent() is None  # apt knows no qemu-guest-agent
