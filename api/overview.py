"""The fleet overview at the top of /ui, pure: VMs by phase, each host's capacity against what
its VMs ask, and the VMs using the most CPU and memory now. Rendered as HTML with SVG bars
(api/charts.py); the figures are also written as text beside each bar (its text alternative).

"Now", from the usage store (docs/usage.md): memory is the RSS of the sampler's last sample
(at most `usage_sample_seconds` old); CPU is the mean number of cores used over the current and
the previous UTC hour while the VM was up (the store keeps hours, not samples).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from api.charts import esc, meter, patterns_defs, stacked
from api.types import Phase, QemuVM
from api.usage import HourUsage

TOP_VMS = 5
# The phases in which QEMU runs, so that "now" means something.
RUNS = frozenset({Phase.RUNNING, Phase.PAUSED})
MIB = 1024 * 1024
# Phases in the order a reader scans them, each with its own pattern (readable without colour).
PHASE_ORDER = (
    (Phase.RUNNING, "solid"),
    (Phase.PAUSED, "vertical"),
    (Phase.PENDING, "hatch"),
    (Phase.STARTING, "hatch"),
    (Phase.STOPPING, "hatch"),
    (Phase.STOPPED, "dots"),
    (Phase.CRASH_LOOP_BACK_OFF, "cross"),
    (Phase.FAILED, "cross"),
    (Phase.INVALID, "cross"),
)


@dataclass(frozen=True, slots=True)
class VMNow:
    project: str
    name: str
    cpu_cores: float | None
    memory_mib: float | None


@dataclass(frozen=True, slots=True)
class HostDisk:
    """A host's disk: what its VMs' disk files take (from usage), and the filesystem's size when
    this server can see it (None: another machine)."""

    used_bytes: int
    capacity_bytes: int | None


def phase_counts(vms: Iterable[QemuVM]) -> dict[str, int]:
    """How many VMs are in each phase, every phase listed (zeros included), in PHASE_ORDER."""
    counts = Counter(vm.status.phase for vm in vms)
    return {phase.value: counts.get(phase, 0) for phase, _ in PHASE_ORDER}


def vms_now(vms: Iterable[QemuVM], hours: Iterable[HourUsage], rss_bytes: Mapping[str, int]) -> list[VMNow]:
    """Each VM's CPU (mean cores over `hours`, while up) and memory (the last sampled RSS, else
    the mean of `hours`); None where nothing was measured, and for a VM whose QEMU is not up."""
    sums: dict[str, list[float]] = {}
    for row in hours:
        cpu, mem, up = sums.setdefault(row.uid, [0.0, 0.0, 0.0])
        usage = row.usage
        sums[row.uid] = [cpu + usage.cpu_seconds, mem + usage.memory_mib_seconds, up + usage.uptime_seconds]
    result = []
    for vm in vms:
        if vm.status.phase not in RUNS:
            result.append(VMNow(vm.metadata.project, vm.metadata.name, None, None))
            continue
        cpu, mem, up = sums.get(vm.metadata.uid, [0.0, 0.0, 0.0])
        rss = rss_bytes.get(vm.metadata.uid)
        memory = rss / MIB if rss is not None else (mem / up if up > 0 else None)
        result.append(VMNow(vm.metadata.project, vm.metadata.name, cpu / up if up > 0 else None, memory))
    return result


def top_by(now: Sequence[VMNow], key: str, count: int = TOP_VMS) -> list[VMNow]:
    """The `count` VMs with the most of `key` ("cpu_cores" or "memory_mib"), measured ones only,
    largest first, ties by project and name."""
    measured = [vm for vm in now if getattr(vm, key) is not None]
    return sorted(measured, key=lambda vm: (-getattr(vm, key), vm.project, vm.name))[:count]


def disk_by_host(vms: Iterable[QemuVM], disk_bytes: Mapping[str, int]) -> dict[str, int]:
    """The disk bytes of the VMs placed on each host (by their latest usage hour)."""
    totals: dict[str, int] = {}
    for vm in vms:
        if vm.status.host is not None:
            totals[vm.status.host] = totals.get(vm.status.host, 0) + disk_bytes.get(vm.metadata.uid, 0)
    return totals


# ---- HTML -------------------------------------------------------------------------------------


def overview_section(
    vms: Sequence[QemuVM],
    hosts: Sequence[Mapping[str, Any]],
    disks: Mapping[str, HostDisk],
    now: Sequence[VMNow],
    *,
    fragment_url: str,
    refresh_ms: int,
) -> str:
    """The overview as one <section>, which the script replaces with a fresh copy from
    `fragment_url` when the VMs change and every `refresh_ms`."""
    return (
        f'<section id="overview" class="overview" aria-labelledby="h-overview"'
        f' data-fragment="{esc(fragment_url)}" data-refresh-ms="{refresh_ms}">'
        f'<h2 id="h-overview">Overview</h2>{patterns_defs()}'
        f"{_phases(vms)}{_hosts(hosts, disks)}{_top(now)}</section>"
    )


def _phases(vms: Sequence[QemuVM]) -> str:
    counts = phase_counts(vms)
    shown = [(phase.value, counts[phase.value], pattern) for phase, pattern in PHASE_ORDER]
    text = ", ".join(f"{name} {count}" for name, count, _ in shown if count) or "no VMs"
    items = "".join(
        f'<li data-phase="{esc(name)}" data-count="{count}"><span class="phase phase-{esc(name)}">'
        f"{esc(name)}</span> {count}</li>"
        for name, count, _ in shown
        if count
    )
    bar = stacked("VMs by phase", shown, text=text)
    return (
        f'<div class="phases"><h3>VMs by phase <small>({len(vms)} in all)</small></h3>{bar}'
        f'<ul class="legend" id="phase-counts">{items or "<li>No VMs yet.</li>"}</ul></div>'
    )


def _hosts(hosts: Sequence[Mapping[str, Any]], disks: Mapping[str, HostDisk]) -> str:
    rows = "".join(_host_row(host, disks.get(str(host["name"]))) for host in hosts)
    empty = '<tr class="empty"><td colspan="6">No host has registered yet.</td></tr>'
    return (
        '<table id="hosts" class="capacity"><caption>Hosts: what their VMs ask against capacity</caption>'
        '<thead><tr><th scope="col">HOST</th><th scope="col">STATUS</th><th scope="col">VCPUS</th>'
        '<th scope="col">MEMORY</th><th scope="col">PORTS</th><th scope="col">DISK</th></tr></thead>'
        f"<tbody>{rows or empty}</tbody></table>"
    )


def _host_row(host: Mapping[str, Any], disk: HostDisk | None) -> str:
    name, capacity, allocated = str(host["name"]), host["capacity"], host["allocated"]
    status = ("Ready" if host["ready"] else "NotReady") + (",SchedulingDisabled" if host["cordoned"] else "")
    cells = [
        _meter_cell("vCPUs", allocated["cpus"], capacity["cpus"], "vCPUs", "cpus"),
        _meter_cell("Memory", allocated["memoryMiB"], capacity["memoryMiB"], "MiB", "memory"),
        _meter_cell("Ports", allocated["ports"], capacity["ports"], "ports", "ports"),
        _disk_cell(disk),
    ]
    state_class = "ok" if host["ready"] else "bad"
    return (
        f'<tr data-host="{esc(name)}"><th scope="row">{esc(name)}</th>'
        f'<td data-col="status" class="{state_class}">{esc(status)}</td>{"".join(cells)}</tr>'
    )


def _meter_cell(label: str, used: float, capacity: float, unit: str, col: str) -> str:
    text = f"{used:g} of {capacity:g} {unit}"
    return (
        f'<td data-col="{col}">{meter(label, used, capacity, text=text)}'
        f'<span class="figure">{esc(text)}</span></td>'
    )


def _disk_cell(disk: HostDisk | None) -> str:
    if disk is None:
        return '<td data-col="disk"><span class="figure">—</span></td>'
    used_mib = disk.used_bytes / MIB
    if disk.capacity_bytes is None:
        return f'<td data-col="disk"><span class="figure">{used_mib:.0f} MiB (size not reported)</span></td>'
    return _meter_cell("Disk", round(used_mib), round(disk.capacity_bytes / MIB), "MiB", "disk")


def _top(now: Sequence[VMNow]) -> str:
    cpu = _top_list("Most CPU now", top_by(now, "cpu_cores"), "cpu_cores", "cores", "top-cpu")
    memory = _top_list("Most memory now", top_by(now, "memory_mib"), "memory_mib", "MiB", "top-memory")
    return f'<div class="top">{cpu}{memory}</div>'


def _top_list(title: str, vms: Sequence[VMNow], key: str, unit: str, ident: str) -> str:
    largest = max((float(getattr(vm, key)) for vm in vms), default=0.0)
    items = "".join(_top_item(vm, float(getattr(vm, key)), largest, unit) for vm in vms)
    body = f"<ol>{items}</ol>" if items else "<p class='muted'>Nothing measured yet.</p>"
    return f'<div id="{ident}"><h3>{esc(title)}</h3>{body}</div>'


def _top_item(vm: VMNow, value: float, largest: float, unit: str) -> str:
    amount = _amount(value, unit)
    return (
        f'<li data-vm="{esc(vm.project)}/{esc(vm.name)}">'
        f"{meter(f'{vm.project}/{vm.name}', value, largest, text=amount)}"
        f' <a href="{esc(_vm_href(vm))}">{esc(vm.name)}</a> <small>{esc(vm.project)}</small>'
        f' <span class="figure">{esc(amount)}</span></li>'
    )


def _amount(value: float, unit: str) -> str:
    return f"{value:.2f} {unit}" if unit == "cores" else f"{value:.0f} {unit}"


def _vm_href(vm: VMNow) -> str:
    return f"/ui/projects/{quote(vm.project, safe='')}/vms/{quote(vm.name, safe='')}"
