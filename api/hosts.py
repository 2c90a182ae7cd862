"""Hosts as the store and the API see them, and what a VM asks of one (pure).

A host is the machine of one controller (`--host-name`). It registers what it offers
(`Capacity`), renews a lease stamped with the database's clock, and is Ready while that lease
has not expired. Placement (controller/placement.py) and `GET /api/v1/hosts` both count what
the VMs placed on a host ask of it with `demand_of`, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from api import names


@dataclass(frozen=True, slots=True)
class Resources:
    """vCPUs, memory and ports from the port range: a host's capacity, or what VMs ask of it."""

    cpus: int = 0
    memory_mib: int = 0
    ports: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.memory_mib + other.memory_mib, self.ports + other.ports)

    def to_json(self) -> dict[str, int]:
        return {"cpus": self.cpus, "memoryMiB": self.memory_mib, "ports": self.ports}

    def by_resource(self) -> dict[str, int]:
        """The amounts by their metric label (tofu_qemu_host_capacity{resource})."""
        return {"cpus": self.cpus, "memory_mib": self.memory_mib, "ports": self.ports}


@dataclass(frozen=True, slots=True)
class Demand:
    """What one VM asks of the host it is placed on."""

    resources: Resources = Resources()
    node_selector: Mapping[str, str] = field(default_factory=dict)


# A spec that cannot be read asks for nothing: it never runs.
NOTHING = Demand()


def demand_of(spec: Mapping[str, Any] | None) -> Demand:
    """The demand of a stored canonical spec (camelCase JSON); NOTHING for an unreadable one."""
    if not spec:
        return NOTHING
    try:
        forwards = spec.get("network", {}).get("forwards", [])
        resources = Resources(
            cpus=int(spec.get("cpus", 1)),
            memory_mib=int(spec.get("memory", 512)),
            ports=sum(1 for forward in forwards if forward.get("hostPort") is None),
        )
        selector = spec.get("nodeSelector") or {}
        return Demand(resources, {str(key): str(value) for key, value in dict(selector).items()})
    except (AttributeError, TypeError, ValueError):
        return NOTHING


@dataclass(frozen=True, slots=True)
class PlacedVM:
    """A live VM as placement sees it: where it is (None: not placed) and what it asks."""

    uid: str
    project: str
    name: str
    host: str | None
    demand: Demand
    scheduling: str | None = None
    # A disk of its own is retained (reclaimPolicy: Retain): it stays on its host when its host is lost.
    holds_data: bool = False


@dataclass(frozen=True, slots=True)
class Host:
    """One row of the hosts table."""

    name: str
    labels: Mapping[str, str]
    capacity: Resources
    cordoned: bool
    registered_at: datetime
    lease_renewed_at: datetime
    lease_seconds: float
    epoch: int

    def ready(self, now: datetime) -> bool:
        """Whether its lease still runs at `now` (the database's clock)."""
        return now - self.lease_renewed_at < timedelta(seconds=self.lease_seconds)

    def lease_age(self, now: datetime) -> float:
        return max(0.0, (now - self.lease_renewed_at).total_seconds())


def host_document(host: Host, demands: Iterable[Demand], now: datetime) -> dict[str, Any]:
    """A host as `GET /api/v1/hosts` serves it: `demands` are those of the VMs placed on it."""
    placed = list(demands)
    allocated = sum((demand.resources for demand in placed), Resources())
    return {
        "name": host.name,
        "ready": host.ready(now),
        "cordoned": host.cordoned,
        "labels": dict(host.labels),
        "capacity": host.capacity.to_json(),
        "allocated": allocated.to_json(),
        "vms": len(placed),
        "leaseRenewedAt": host.lease_renewed_at.isoformat(),
        "epoch": host.epoch,
    }


def parse_host_labels(text: str) -> dict[str, str]:
    """Labels from "k=v,k2=v2" (Kubernetes label syntax). :raise ValueError: a malformed entry."""
    labels: dict[str, str] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        problem = (
            "must be KEY=VALUE"
            if not sep
            else names.label_key_problem(key.strip()) or names.label_value_problem(value.strip())
        )
        if problem:
            raise ValueError(f"host label {entry[:80]!r}: {problem}")
        labels[key.strip()] = value.strip()
    if len(labels) > names.LABELS_MAX:
        raise ValueError(f"at most {names.LABELS_MAX} host labels")
    return labels


def host_name_problem(name: str) -> str | None:
    """Why `name` cannot name a host (it goes in URLs, logs and label values), or None."""
    return names.dns_label_problem(name) if "." not in name else _dotted_problem(name)


def _dotted_problem(name: str) -> str | None:
    if len(name) > HOST_NAME_MAX:
        return f"must be at most {HOST_NAME_MAX} characters"
    for part in name.split("."):
        problem = names.dns_label_problem(part)
        if problem:
            return f"{name[:80]!r}: each dot-separated part {problem}"
    return None


HOST_NAME_MAX = 253
