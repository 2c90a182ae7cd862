"""How much memory a new VM may take: the host's MemAvailable, and inside a container (or any
memory-limited cgroup) what is left under the cgroup's limit, whichever is smaller.

A container sees the whole host in /proc/meminfo, so without the cgroup a 512 MiB container on a
24 GiB host would start VMs until the kernel's OOM killer chose one. Like the kubelet, usage
leaves out inactive file cache, which the kernel reclaims before it kills anything.
"""

from __future__ import annotations

from pathlib import Path

MIB = 1024 * 1024
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit value.
_V1_UNLIMITED = 1 << 62


def available_mib(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smaller of MemAvailable and the cgroup's headroom, in MiB; None when neither is known."""
    known = [
        value
        for value in (_meminfo_available(proc), _cgroup_headroom(proc, cgroup_root))
        if value is not None
    ]
    return min(known) // MIB if known else None


def capacity_mib(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What VMs may use here at most, in MiB: MemTotal, or the cgroup's limit when lower."""
    known = [
        value
        for value in (_meminfo(proc, "MemTotal:"), _cgroup_limit(proc, cgroup_root))
        if value is not None
    ]
    return min(known) // MIB if known else None


def _meminfo_available(proc: Path) -> int | None:
    return _meminfo(proc, "MemAvailable:")


def _meminfo(proc: Path, key: str) -> int | None:
    try:
        for line in (proc / "meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit(proc: Path, root: Path) -> int | None:
    """The limit of this process's memory cgroup, in bytes (None: unlimited or unknown)."""
    return _cgroup_headroom(proc, root, limit_only=True)


def _cgroup_headroom(proc: Path, root: Path, *, limit_only: bool = False) -> int | None:
    """Limit minus working set of this process's memory cgroup (v2, else v1), in bytes."""
    try:
        lines = (proc / "self" / "cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found = _headroom(
                _cgroup_dir(root, path), "memory.max", "memory.current", "inactive_file", limit_only
            )
        elif "memory" in controllers.split(","):
            found = _headroom(
                _cgroup_dir(root / "memory", path),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
                limit_only,
            )
        else:
            continue
        if found is not None:
            return found
    return None


def _cgroup_dir(mount: Path, path: str) -> Path:
    """The cgroup's directory; inside a container's cgroup namespace its own path is "/"."""
    candidate = mount / path.lstrip("/")
    return candidate if candidate.is_dir() else mount


def _headroom(
    directory: Path, limit_file: str, usage_file: str, inactive_key: str, limit_only: bool
) -> int | None:
    try:
        limit_text = (directory / limit_file).read_text(encoding="ascii").strip()
        if limit_text == "max" or int(limit_text) >= _V1_UNLIMITED:
            return None
        if limit_only:
            return int(limit_text)
        usage = int((directory / usage_file).read_text(encoding="ascii").strip())
        inactive = 0
        for line in (directory / "memory.stat").read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        return None
    return max(0, int(limit_text) - max(0, usage - inactive))
