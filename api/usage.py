"""Usage metering's values and the usage report the API serves (docs/usage.md). Pure.

The controller's sampler produces `HourUsage` rows (controller/metering.py does the math), the
store sums them per VM per hour (api/store/usage.py), and `build_report` turns the stored hours
of a range into per-VM and per-project totals plus the hourly points a chart draws.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


@dataclass(frozen=True, slots=True)
class Usage:
    cpu_seconds: float = 0.0
    memory_mib_seconds: float = 0.0
    uptime_seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu_seconds + other.cpu_seconds,
            self.memory_mib_seconds + other.memory_mib_seconds,
            self.uptime_seconds + other.uptime_seconds,
        )

    def scaled(self, factor: float) -> Usage:
        # Field by field: dataclasses.astuple deep-copies each value, a sampler round's main cost.
        return Usage(
            self.cpu_seconds * factor, self.memory_mib_seconds * factor, self.uptime_seconds * factor
        )


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last sample counted for a VM: where the next delta starts. `at`: epoch seconds."""

    pid: int
    start_ticks: int
    cpu_ticks: int
    rss_bytes: int
    at: float


@dataclass(frozen=True, slots=True)
class HourUsage:
    """A VM's usage within one UTC hour (`hour` is its start); `disk_bytes` as last sampled."""

    uid: str
    project: str
    vm_name: str
    hour: datetime
    usage: Usage
    disk_bytes: int


@dataclass(frozen=True, slots=True)
class MinuteUsage:
    """A VM's usage within one UTC minute (`minute` is its start): the fine series the VM page's
    charts draw, kept usage_minutes_retention_hours (api/store/usage_minutes.py)."""

    uid: str
    project: str
    vm_name: str
    minute: datetime
    usage: Usage


@dataclass(frozen=True, slots=True)
class SpanUsage:
    """The usage of every uid of one VM name from `start` for `length` (a chart's bar)."""

    start: datetime
    length: timedelta
    usage: Usage


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class UsageFigures(_Model):
    cpu_seconds: float = Field(description="CPU time of the VM's QEMU (every thread), seconds")
    memory_mib_seconds: float = Field(description="Resident memory integrated over time, MiB x seconds")
    uptime_seconds: float = Field(description="Time the VM's QEMU process existed, paused or not, seconds")
    disk_bytes: int = Field(description="Bytes allocated by the VM's disk files at the latest sample")


class UsagePoint(UsageFigures):
    hour: datetime = Field(description="Start of the UTC hour these figures cover")


class VMUsage(_Model):
    uid: str
    name: str
    total: UsageFigures
    points: tuple[UsagePoint, ...] = Field(description="Hourly figures, oldest first")


class UsageReport(_Model):
    api_version: Literal["tofu-qemu.dev/v1alpha1"] = "tofu-qemu.dev/v1alpha1"
    kind: Literal["UsageReport"] = "UsageReport"
    project: str
    from_: datetime = Field(alias="from", description="Start of the range (the hours that end after it)")
    to: datetime = Field(description="End of the range (the hours that start before it)")
    total: UsageFigures = Field(description="The project's totals: sums over its VMs")
    vms: tuple[VMUsage, ...] = Field(description="Each VM (by uid, deleted ones too) with usage in the range")


def figures(usage: Usage, disk_bytes: int) -> UsageFigures:
    return UsageFigures(
        cpu_seconds=round(usage.cpu_seconds, 3),
        memory_mib_seconds=round(usage.memory_mib_seconds, 3),
        uptime_seconds=round(usage.uptime_seconds, 3),
        disk_bytes=disk_bytes,
    )


def build_report(
    project: str, start: datetime, end: datetime, hours: Iterable[HourUsage], *, points: bool
) -> UsageReport:
    """The report of `hours` (one project's, oldest first per VM): totals per VM (disk bytes:
    the VM's latest) and per project (sums), and the hourly points when `points`."""
    by_uid: dict[str, list[HourUsage]] = {}
    for row in hours:
        by_uid.setdefault(row.uid, []).append(row)
    vms: list[VMUsage] = []
    project_usage, project_disk = Usage(), 0
    for uid, rows in sorted(by_uid.items(), key=lambda item: (item[1][-1].vm_name, item[0])):
        total = sum((row.usage for row in rows), Usage())
        latest = max(rows, key=lambda row: row.hour)
        project_usage, project_disk = project_usage + total, project_disk + latest.disk_bytes
        hourly = tuple(
            UsagePoint(hour=row.hour, **figures(row.usage, row.disk_bytes).model_dump()) for row in rows
        )
        vms.append(
            VMUsage(
                uid=uid,
                name=latest.vm_name,
                total=figures(total, latest.disk_bytes),
                points=hourly if points else (),
            )
        )
    return UsageReport(
        project=project,
        from_=start,
        to=end,
        total=figures(project_usage, project_disk),
        vms=tuple(vms),
    )
