"""Placement: which host each unplaced VM goes to (pure; docs/multi-host.md).

`place(vms, hosts, now)` looks at every live VM (those placed count against their host) and
assigns each unplaced one, oldest first, to a host that

- is Ready (its lease runs at `now`, the database's clock) and not cordoned;
- has every label of the VM's `spec.nodeSelector`;
- has the VM's memory free (capacity minus what the VMs placed there ask) and, for forwards
  without hostPort, as many free ports in its range.

vCPUs are overcommitted, as on one host today: they weigh in the choice, never refuse it (the
`max_vcpus` quota limits them). Among the hosts that fit, the least loaded after the placement
wins (the larger of its memory and vCPU shares), then the one with fewer VMs, then by name:
VMs spread by default. A VM no host fits gets the reason, with the numbers of each host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from api.hosts import Demand, Host, PlacedVM, Resources

# The reason names at most this many hosts (the rest are counted), so it stays readable.
HOSTS_IN_REASON = 8


@dataclass(frozen=True, slots=True)
class Placement:
    """uid -> host for the VMs placed; uid -> why not for those no host takes."""

    assignments: dict[str, str] = field(default_factory=dict)
    unschedulable: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _Load:
    host: Host
    allocated: Resources
    vms: int

    def refusal(self, demand: Demand, now: datetime) -> str | None:
        """Why this host cannot take `demand`, or None."""
        host = self.host
        if not host.ready(now):
            return "NotReady"
        if host.cordoned:
            return "cordoned"
        missing = {key: value for key, value in demand.node_selector.items() if host.labels.get(key) != value}
        if missing:
            wanted = ",".join(f"{key}={value}" for key, value in sorted(missing.items()))
            return f"no label {wanted}"
        free = _minus(host.capacity, self.allocated)
        wants = demand.resources
        if wants.memory_mib > free.memory_mib:
            return f"{free.memory_mib} of {host.capacity.memory_mib} MiB free"
        if wants.ports > free.ports:
            return f"{free.ports} of {host.capacity.ports} ports free"
        return None

    def share_after(self, demand: Demand) -> float:
        after = self.allocated + demand.resources
        capacity = self.host.capacity
        return max(after.memory_mib / max(capacity.memory_mib, 1), after.cpus / max(capacity.cpus, 1))


def place(vms: Sequence[PlacedVM], hosts: Sequence[Host], now: datetime) -> Placement:
    """Assign the unplaced VMs of `vms` to `hosts` (see the module's docstring)."""
    loads = {host.name: _Load(host, Resources(), 0) for host in hosts}
    for vm in vms:
        load = loads.get(vm.host) if vm.host is not None else None
        if load is not None:
            load.allocated += vm.demand.resources
            load.vms += 1
    placement = Placement()
    for vm in vms:
        if vm.host is not None:
            continue
        refusals = {name: load.refusal(vm.demand, now) for name, load in loads.items()}
        fitting = [loads[name] for name, refusal in refusals.items() if refusal is None]
        if not fitting:
            placement.unschedulable[vm.uid] = unschedulable_reason(vm.demand, refusals)
            continue
        best = min(fitting, key=lambda load: (load.share_after(vm.demand), load.vms, load.host.name))
        best.allocated += vm.demand.resources
        best.vms += 1
        placement.assignments[vm.uid] = best.host.name
    return placement


def lost_hosts(hosts: Sequence[Host], now: datetime, grace: timedelta) -> dict[str, str]:
    """Hosts whose lease ran out more than `grace` ago: name -> why, for their VMs' condition."""
    return {
        host.name: f"host {host.name} lost: no lease renewal since {host.lease_renewed_at.isoformat()}"
        for host in hosts
        if now - host.lease_renewed_at >= timedelta(seconds=host.lease_seconds) + grace
    }


def lost_notes(vms: Sequence[PlacedVM], lost: Mapping[str, str]) -> dict[str, str | None]:
    """The placed VMs whose note must change: set on a lost host's VMs, cleared once it is back."""
    notes: dict[str, str | None] = {}
    for vm in vms:
        if vm.host is None:
            continue
        wanted = lost.get(vm.host)
        if wanted != vm.scheduling:
            notes[vm.uid] = wanted
    return notes


def unschedulable_reason(demand: Demand, refusals: Mapping[str, str | None]) -> str:
    wants = demand.resources
    asked = f"{wants.memory_mib} MiB, {wants.cpus} vCPU(s), {wants.ports} port(s)"
    if demand.node_selector:
        asked += ", nodeSelector " + ",".join(f"{k}={v}" for k, v in sorted(demand.node_selector.items()))
    if not refusals:
        return f"no host fits {asked}: no host is registered"
    named = sorted(refusals.items())[:HOSTS_IN_REASON]
    listed = "; ".join(f"{name}: {refusal}" for name, refusal in named)
    more = len(refusals) - len(named)
    return f"no host fits {asked}: {listed}" + (f"; and {more} more" if more > 0 else "")


def _minus(capacity: Resources, allocated: Resources) -> Resources:
    return Resources(
        capacity.cpus - allocated.cpus,
        max(0, capacity.memory_mib - allocated.memory_mib),
        max(0, capacity.ports - allocated.ports),
    )
