"""Quotas: which VMs may start, decided over the whole fleet. Pure.

Every VM that wants to run (valid spec, not deleting, runStrategy not Halted) claims its vCPUs,
memory and disk sizes. Claims are admitted oldest first (creationTimestamp, then uid), so the
verdict is deterministic and a new VM never pushes out an older one; a VM that does not fit is
skipped and later, smaller ones may still fit. Limits apply per server and per project. Freeing
room (deleting or halting a VM, raising a limit) admits the next VM at its next reconcile.

Admission gates starts only: a VM already running is never stopped because a limit went down.

Ready snapshots hold disk space too (as much as their disks' virtual size): they count against
max_disk_gib before any VM, so a VM whose disks would take its project past the limit does not
start. Taking a snapshot past the limit is refused by the snapshot controller.

Host ports are part of it too: a forward's explicit hostPort must lie in the controller's port
range (the API process may not know that range, so the controller decides, and says which field
is wrong), and the number of forwards counts against max_ports.

Every project gets the default project quota (max_disk_gib=1024 unless configured) for the
limits its own entry does not set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime

from api.types import QemuVMSpec

MIB_PER_GIB = 1024
_LIMIT_UNITS = {"max_memory_mib": " MiB", "max_disk_gib": " GiB"}
# What holds each limit's units besides the VMs decided before this one.
_HOLDERS = {"max_disk_gib": "older VMs and snapshots"}


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits; None is unlimited."""

    max_vms: int | None = None
    max_memory_mib: int | None = None
    max_vcpus: int | None = None
    max_disk_gib: int | None = None
    max_ports: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return all(getattr(self, limit.name) is None for limit in fields(self))

    def over(self, default: Quota) -> Quota:
        """These limits, with `default`'s where these set none."""
        return Quota(
            **{
                limit.name: getattr(default, limit.name)
                if getattr(self, limit.name) is None
                else getattr(self, limit.name)
                for limit in fields(self)
            }
        )


@dataclass(frozen=True, slots=True)
class Claim:
    uid: str
    project: str
    created_at: datetime
    vcpus: int
    memory_mib: int
    disk_mib: int
    ports: int = 0


QUOTA_EXCEEDED = "QuotaExceeded"
# The spec cannot run on this controller (a hostPort outside its port range): Valid=False.
INVALID_SPEC = "InvalidSpec"


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool = True
    message: str = ""
    reason: str = QUOTA_EXCEEDED

    @property
    def invalid_spec(self) -> bool:
        return not self.admitted and self.reason == INVALID_SPEC


ADMITTED = Admission()


@dataclass(slots=True)
class _Usage:
    vms: int = 0
    memory_mib: int = 0
    vcpus: int = 0
    disk_mib: int = 0
    ports: int = 0

    def add(self, claim: Claim) -> None:
        self.vms += 1
        self.memory_mib += claim.memory_mib
        self.vcpus += claim.vcpus
        self.disk_mib += claim.disk_mib
        self.ports += claim.ports


@dataclass(frozen=True, slots=True)
class Quotas:
    server: Quota = Quota()
    projects: Mapping[str, Quota] = field(default_factory=dict)
    # For every project, under the limits its own entry sets.
    project_default: Quota = Quota()

    def project(self, name: str) -> Quota:
        return self.projects.get(name, Quota()).over(self.project_default)


def admit(
    claims: Iterable[Claim], quotas: Quotas, held_disk_mib: Mapping[str, int] | None = None
) -> dict[str, Admission]:
    """The verdict for every claim, oldest first. Claims not admitted consume nothing.

    `held_disk_mib`: disk space already held per project by other things than VMs (snapshots),
    counted against max_disk_gib before any VM."""
    held = held_disk_mib or {}
    server_usage = _Usage(disk_mib=sum(held.values()))
    project_usage = {project: _Usage(disk_mib=mib) for project, mib in held.items()}
    verdicts: dict[str, Admission] = {}
    for claim in sorted(claims, key=lambda c: (c.created_at, c.uid)):
        usage = project_usage.setdefault(claim.project, _Usage())
        problem = _over("server", quotas.server, server_usage, claim) or _over(
            f"project {claim.project}", quotas.project(claim.project), usage, claim
        )
        if problem:
            verdicts[claim.uid] = Admission(False, problem)
            continue
        server_usage.add(claim)
        usage.add(claim)
        verdicts[claim.uid] = Admission()
    return verdicts


def _over(scope: str, quota: Quota, usage: _Usage, claim: Claim) -> str:
    """Why `claim` does not fit `quota` on top of `usage` ("" when it fits), with the numbers."""
    checks = (
        ("max_vms", quota.max_vms, usage.vms, 1, ""),
        ("max_memory_mib", quota.max_memory_mib, usage.memory_mib, claim.memory_mib, " MiB"),
        ("max_vcpus", quota.max_vcpus, usage.vcpus, claim.vcpus, ""),
        (
            "max_disk_gib",
            None if quota.max_disk_gib is None else quota.max_disk_gib * MIB_PER_GIB,
            usage.disk_mib,
            claim.disk_mib,
            " MiB",
        ),
        ("max_ports", quota.max_ports, usage.ports, claim.ports, ""),
    )
    for name, limit, used, wanted, unit in checks:
        if limit is not None and used + wanted > limit:
            return (
                f"{scope} {name}: {wanted}{unit} requested, {used}{unit} in use by"
                f" {_HOLDERS.get(name, 'older VMs')}, limit {getattr(quota, name)}"
                f"{_LIMIT_UNITS.get(name, '')}"
            )
    return ""


def host_port_problem(spec: QemuVMSpec, port_range: tuple[int, int]) -> str:
    """Why `spec` cannot run with this port range ("" when it can), naming the field."""
    first, last = port_range
    for index, forward in enumerate(spec.network.forwards):
        port = forward.host_port
        if port is not None and not first <= port <= last:
            return (
                f"spec.network.forwards[{index}].hostPort: {port} is outside the port range {first}-{last}"
                " of this host"
            )
    return ""


def parse_project_quotas(text: str) -> dict[str, Quota]:
    """`lab:max_vms=3,max_memory_mib=2048;ci:max_vcpus=4` -> per-project quotas.

    :raise ValueError: malformed, an unknown limit, or a value that is not a positive integer.
    """
    quotas: dict[str, Quota] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        project, sep, limits = entry.partition(":")
        if not sep or not project.strip():
            raise ValueError(f"project quota {entry!r} must look like PROJECT:max_vms=N,...")
        quotas[project.strip()] = parse_quota(limits, what="project quota")
    return quotas


def parse_quota(text: str, *, what: str = "quota") -> Quota:
    """`max_vms=3,max_disk_gib=1024` -> a Quota. :raise ValueError: as parse_project_quotas."""
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, number = item.partition("=")
        if not eq or name not in Quota.__dataclass_fields__:
            known = ", ".join(Quota.__dataclass_fields__)
            raise ValueError(f"{what} {item!r}: expected one of {known} with =N")
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"{what} {item!r}: the limit must be a positive integer")
        values[name] = int(number)
    return Quota(**values)
