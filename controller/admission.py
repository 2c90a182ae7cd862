"""Quotas: which VMs may start, decided over the whole fleet. Pure.

Every VM that wants to run (valid spec, not deleting, runStrategy not Halted) claims its vCPUs,
memory and disk sizes. Claims are admitted oldest first (creationTimestamp, then uid), so the
verdict is deterministic and a new VM never pushes out an older one; a VM that does not fit is
skipped and later, smaller ones may still fit. Limits apply per server and per project. Freeing
room (deleting or halting a VM, raising a limit) admits the next VM at its next reconcile.

Admission gates starts only: a VM already running is never stopped because a limit went down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

MIB_PER_GIB = 1024
_LIMIT_UNITS = {"max_memory_mib": " MiB", "max_disk_gib": " GiB"}


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits; None is unlimited."""

    max_vms: int | None = None
    max_memory_mib: int | None = None
    max_vcpus: int | None = None
    max_disk_gib: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return all(
            limit is None for limit in (self.max_vms, self.max_memory_mib, self.max_vcpus, self.max_disk_gib)
        )


@dataclass(frozen=True, slots=True)
class Claim:
    uid: str
    project: str
    created_at: datetime
    vcpus: int
    memory_mib: int
    disk_mib: int


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool = True
    message: str = ""


ADMITTED = Admission()


@dataclass(slots=True)
class _Usage:
    vms: int = 0
    memory_mib: int = 0
    vcpus: int = 0
    disk_mib: int = 0

    def add(self, claim: Claim) -> None:
        self.vms += 1
        self.memory_mib += claim.memory_mib
        self.vcpus += claim.vcpus
        self.disk_mib += claim.disk_mib


@dataclass(frozen=True, slots=True)
class Quotas:
    server: Quota = Quota()
    projects: Mapping[str, Quota] = field(default_factory=dict)

    @property
    def is_unlimited(self) -> bool:
        return self.server.is_unlimited and all(quota.is_unlimited for quota in self.projects.values())


def admit(claims: Iterable[Claim], quotas: Quotas) -> dict[str, Admission]:
    """The verdict for every claim, oldest first. Claims not admitted consume nothing."""
    server_usage = _Usage()
    project_usage: dict[str, _Usage] = {}
    verdicts: dict[str, Admission] = {}
    for claim in sorted(claims, key=lambda c: (c.created_at, c.uid)):
        usage = project_usage.setdefault(claim.project, _Usage())
        problem = _over("server", quotas.server, server_usage, claim) or _over(
            f"project {claim.project}", quotas.projects.get(claim.project, Quota()), usage, claim
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
    )
    for name, limit, used, wanted, unit in checks:
        if limit is not None and used + wanted > limit:
            return (
                f"{scope} {name}: {wanted}{unit} requested, {used}{unit} in use by older VMs, "
                f"limit {getattr(quota, name)}{_LIMIT_UNITS.get(name, '')}"
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
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in limits.split(","))):
            name, eq, number = item.partition("=")
            if not eq or name not in Quota.__dataclass_fields__:
                known = ", ".join(Quota.__dataclass_fields__)
                raise ValueError(f"project quota {item!r}: expected one of {known} with =N")
            if not number.isdigit() or int(number) < 1:
                raise ValueError(f"project quota {item!r}: the limit must be a positive integer")
            values[name] = int(number)
        quotas[project.strip()] = Quota(**values)
    return quotas
