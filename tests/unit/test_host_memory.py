"""Memory available to a new VM: MemAvailable, capped by a memory-limited cgroup (a container)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.host_memory import available_mib, capacity_mib

MIB = 1024 * 1024


def fake_proc(tmp_path: Path, *, available_kib: int, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_kib} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def cgroup_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_without_a_limit_it_is_mem_available(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, available_kib=8 * 1024 * 1024, cgroup="0::/\n")
    root = tmp_path / "cg"
    cgroup_files(root, {"memory.max": "max\n", "memory.current": "1000\n", "memory.stat": ""})
    assert available_mib(proc, root) == 8192


@pytest.mark.parametrize("own_path", ["/", "/machine.slice/libpod-1.scope"], ids=["namespaced", "host-view"])
def test_a_cgroup_v2_limit_caps_it_and_file_cache_does_not_count(tmp_path: Path, own_path: str) -> None:
    proc = fake_proc(tmp_path, available_kib=24 * 1024 * 1024, cgroup=f"0::{own_path}\n")
    directory = tmp_path / "cg" / own_path.lstrip("/")
    stat = f"anon 1\ninactive_file {100 * MIB}\nactive_file 5\n"
    cgroup_files(
        directory, {"memory.max": f"{512 * MIB}\n", "memory.current": f"{300 * MIB}\n", "memory.stat": stat}
    )
    assert available_mib(proc, tmp_path / "cg") == 512 - (300 - 100)


def test_a_cgroup_v1_limit_caps_it(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, available_kib=24 * 1024 * 1024, cgroup="4:memory:/docker/abc\n3:cpu:/\n")
    directory = tmp_path / "cg" / "memory" / "docker" / "abc"
    files = {
        "memory.limit_in_bytes": f"{1024 * MIB}\n",
        "memory.usage_in_bytes": f"{900 * MIB}\n",
        "memory.stat": f"cache 5\ntotal_inactive_file {400 * MIB}\n",
    }
    cgroup_files(directory, files)
    assert available_mib(proc, tmp_path / "cg") == 1024 - (900 - 400)


def test_cgroup_v1_without_a_limit_is_ignored(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, available_kib=2048 * 1024, cgroup="4:memory:/\n")
    files = {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.usage_in_bytes": "5\n",
        "memory.stat": "",
    }
    cgroup_files(tmp_path / "cg" / "memory", files)
    assert available_mib(proc, tmp_path / "cg") == 2048


def test_nothing_readable_is_unknown(tmp_path: Path) -> None:
    assert available_mib(tmp_path / "no-proc", tmp_path / "no-cgroup") is None


def test_the_capacity_a_host_registers_is_mem_total_or_the_cgroup_limit(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, available_kib=1024, cgroup="0::/\n")
    root = tmp_path / "cg"
    cgroup_files(root, {"memory.max": "max\n", "memory.current": "1\n", "memory.stat": ""})
    assert capacity_mib(proc, root) == 99999999 // 1024
    cgroup_files(root, {"memory.max": f"{512 * MIB}\n"})
    # The limit, not what is left under it: what the VMs placed here may add up to.
    assert capacity_mib(proc, root) == 512
