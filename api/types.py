"""The QemuVM API types (group tofu-qemu.dev, version v1alpha1).

A QemuVM manifest is what users write as the `input` of a `terraform_data` resource. The
models are frozen and forbid unknown fields, so a typo is a clear error and never silently
ignored. Every value that may reach a QEMU command line or a file path is constrained here by
an allow-list; the argv builder can then rely on it.

Sizes and durations accept friendly forms ("2Gi", "1m30s") and are normalised to integers, so
the canonical spec, and therefore `generation`, depends on meaning, not spelling.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic.alias_generators import to_camel

from api import names, quantity

API_GROUP = "tofu-qemu.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "QemuVM"

MEMORY_MIN_MIB = 16
MEMORY_MAX_MIB = 1024 * 1024
DISK_MAX_MIB = 64 * 1024 * 1024
CPUS_MAX = 64
STOP_TIMEOUT_MAX_SECONDS = 3600
DISKS_MAX = 16
FORWARDS_MAX = 32
CMDLINE_MAX = 2048
IMAGE_PATH_MAX = 255
# A message lists this many validation errors and counts the rest.
ERRORS_SHOWN_MAX = 10


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )


def _check_dns_label(value: str) -> str:
    problem = names.dns_label_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A file name inside the images dir, possibly in sub-folders. Every segment starts with a
# letter, digit or '_', so '..', '.hidden', '-option' and absolute paths cannot be written,
# and ',' / '=' (QEMU option syntax) are simply not in the alphabet.
_IMAGE_PATH_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")


def _check_image_path(value: str) -> str:
    if len(value) > IMAGE_PATH_MAX:
        raise ValueError(f"must be at most {IMAGE_PATH_MAX} characters")
    if not _IMAGE_PATH_RE.fullmatch(value):
        raise ValueError(
            f"{value[:80]!r} must be a file name inside the images dir: letters, digits, "
            "'_', '.', '+', '-' and '/' between names; no '..', no leading '/', '.' or '-'"
        )
    return value


def _check_cmdline(value: str) -> str:
    if len(value) > CMDLINE_MAX:
        raise ValueError(f"must be at most {CMDLINE_MAX} characters")
    if any(not (" " <= ch <= "~") for ch in value):
        raise ValueError("may hold printable ASCII only (no newlines or control characters)")
    return value


def _in_range(low: int, high: int, unit: str) -> AfterValidator:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be ≥ {low}{unit}")
        if value > high:
            raise ValueError(f"must be ≤ {high}{unit}")
        return value

    return AfterValidator(check)


def _at_most(limit: int, what: str) -> BeforeValidator:
    """Refuse an over-long collection before its items are validated: pydantic reports every bad
    item, so 30,000 bad disks would be 30,000 errors and a message megabytes long."""

    def check(value: object) -> object:
        if isinstance(value, list | tuple | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} {what} allowed, not {len(value)}")
        return value

    return BeforeValidator(check)


DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
ImagePath = Annotated[str, AfterValidator(_check_image_path)]
KernelCmdline = Annotated[str, AfterValidator(_check_cmdline)]
MemoryMiB = Annotated[
    int,
    BeforeValidator(quantity.parse_mebibytes),
    _in_range(MEMORY_MIN_MIB, MEMORY_MAX_MIB, " MiB"),
]
DiskMiB = Annotated[int, BeforeValidator(quantity.parse_mebibytes), _in_range(1, DISK_MAX_MIB, " MiB")]
Seconds = Annotated[
    int, BeforeValidator(quantity.parse_seconds), _in_range(0, STOP_TIMEOUT_MAX_SECONDS, " s")
]
# Strict: "80" or 80.0 in a manifest is a mistake worth reporting, not a value to coerce.
Port = Annotated[int, Strict(), _in_range(1, 65535, "")]
UnprivilegedPort = Annotated[int, Strict(), _in_range(1024, 65535, "")]
CpuCount = Annotated[int, Strict(), _in_range(1, CPUS_MAX, "")]


class Machine(StrEnum):
    Q35 = "q35"
    MICROVM = "microvm"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class RunStrategy(StrEnum):
    ALWAYS = "Always"
    RERUN_ON_FAILURE = "RerunOnFailure"
    HALTED = "Halted"


class ReclaimPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class BootSpec(_Model):
    """Direct kernel boot: files in the images dir, and the kernel command line."""

    kernel: ImagePath
    initrd: ImagePath | None = None
    cmdline: KernelCmdline = ""


class DiskSpec(_Model):
    """A disk: a qcow2 overlay on `image` (a file in the images dir), or blank if no image."""

    name: DnsLabel
    image: ImagePath | None = None
    size: DiskMiB | None = Field(default=None, description='MiB, or a quantity like "10Gi"')
    reclaim_policy: ReclaimPolicy = ReclaimPolicy.DELETE

    @model_validator(mode="after")
    def _needs_image_or_size(self) -> DiskSpec:
        if self.image is None and self.size is None:
            raise ValueError("a disk needs an image, a size, or both")
        return self


class PortForward(_Model):
    """A user-mode (SLIRP) host forward to a guest port; hostPort is allocated when omitted."""

    protocol: Protocol = Protocol.TCP
    guest_port: Port
    host_port: UnprivilegedPort | None = None


class NetworkSpec(_Model):
    forwards: Annotated[tuple[PortForward, ...], _at_most(FORWARDS_MAX, "forwards")] = Field(
        default=(), max_length=FORWARDS_MAX
    )

    @model_validator(mode="after")
    def _unique_ports(self) -> NetworkSpec:
        guest_seen: set[tuple[Protocol, int]] = set()
        host_seen: set[tuple[Protocol, int]] = set()
        for forward in self.forwards:
            guest_key = (forward.protocol, forward.guest_port)
            if guest_key in guest_seen:
                raise ValueError(f"guest port {forward.protocol}/{forward.guest_port} is forwarded twice")
            guest_seen.add(guest_key)
            if forward.host_port is not None:
                host_key = (forward.protocol, forward.host_port)
                if host_key in host_seen:
                    raise ValueError(f"host port {forward.protocol}/{forward.host_port} is used twice")
                host_seen.add(host_key)
        return self


class QemuVMSpec(_Model):
    """The desired state of one VM. Defaults are part of the canonical form."""

    cpus: CpuCount = 1
    memory: MemoryMiB = Field(default=512, description='MiB, or a quantity like "2Gi"')
    machine: Machine = Machine.Q35
    accel: Accel = Accel.AUTO
    run_strategy: RunStrategy = RunStrategy.ALWAYS
    boot: BootSpec | None = None
    disks: Annotated[tuple[DiskSpec, ...], _at_most(DISKS_MAX, "disks")] = Field(
        default=(), max_length=DISKS_MAX
    )
    network: NetworkSpec = NetworkSpec()
    stop_timeout: Seconds = Field(default=30, description='seconds, or a duration like "2m"')

    @model_validator(mode="after")
    def _bootable_and_unique_disks(self) -> QemuVMSpec:
        if self.boot is None and not any(disk.image for disk in self.disks):
            raise ValueError("nothing to boot: set boot.kernel or give a disk an image")
        disk_names = [disk.name for disk in self.disks]
        duplicates = sorted({name for name in disk_names if disk_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"disk names must be unique: {', '.join(duplicates)} repeated")
        return self


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        problem = names.label_key_problem(key) or names.label_value_problem(value)
        if problem:
            raise ValueError(problem)
    return labels


Labels = Annotated[dict[str, str], _at_most(names.LABELS_MAX, "labels"), AfterValidator(_check_labels)]


class ManifestMetadata(_Model):
    name: DnsLabel
    labels: Labels = Field(default_factory=dict)


class QemuVMManifest(_Model):
    """What a user declares: the `input` of a terraform_data resource."""

    api_version: Literal["tofu-qemu.dev/v1alpha1"]
    kind: Literal["QemuVM"]
    metadata: ManifestMetadata
    spec: QemuVMSpec


# ---- Objects as stored and served ---------------------------------------------------------


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    FAILED = "Failed"
    INVALID = "Invalid"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: datetime


class ExitReason(StrEnum):
    GUEST_POWEROFF = "guest-poweroff"
    CRASHED = "crashed"
    KILLED = "killed-by-signal"
    STOPPED_BY_CONTROLLER = "stopped-by-controller"
    VANISHED = "vanished"


class LastExit(_Model):
    """How the VM's last QEMU process ended."""

    reason: ExitReason
    exit_code: int | None = None
    signal: int | None = None
    at: datetime
    message: str = ""


class AllocatedPort(_Model):
    protocol: Protocol
    guest_port: int
    host_port: int


class QemuVMStatus(_Model):
    """Observed state. Only the controller writes it; the API shows it.

    Besides what is observed, status carries the controller's memory that must survive its own
    restart: restart and failure counts, the last exit, and when a graceful stop began.
    """

    phase: Phase = Phase.PENDING
    conditions: tuple[Condition, ...] = ()
    observed_generation: int = 0
    pid: int | None = None
    accel: Accel | None = None
    ports: tuple[AllocatedPort, ...] = ()
    restarts: int = 0
    failures: int = Field(default=0, description="Consecutive failed runs, for crash-loop backoff")
    started_at: datetime | None = None
    last_exit: LastExit | None = None
    next_retry_at: datetime | None = None
    stop_requested_at: datetime | None = None


class ObjectMeta(_Model):
    project: str
    name: str
    uid: str
    generation: int
    creation_timestamp: datetime
    deletion_timestamp: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    state_serial: int = Field(description="The state serial that last changed this object")


class QemuVM(_Model):
    """A VM as the spec store holds it.

    `spec` is the canonical spec when valid, or the input as written when it is not (so the
    user sees what was wrong); `status.conditions` then carries `Valid=False`.
    """

    api_version: Literal["tofu-qemu.dev/v1alpha1"] = "tofu-qemu.dev/v1alpha1"
    kind: Literal["QemuVM"] = "QemuVM"
    metadata: ObjectMeta
    spec: dict[str, Any]
    status: QemuVMStatus


def describe_validation_error(error: ValidationError, *, prefix: str = "") -> str:
    """Render pydantic errors as `spec.memory: must be ≥ 16 MiB; ...` for conditions and 4xx.

    At most ERRORS_SHOWN_MAX errors are listed and the rest counted, so a message stays short
    enough for a condition and a table however wrong the input is.
    """
    parts = []
    errors = error.errors(include_url=False)
    for item in errors[:ERRORS_SHOWN_MAX]:
        location = prefix
        for segment in item["loc"]:
            if isinstance(segment, int):
                location += f"[{segment}]"
            else:
                location += f".{segment}" if location else str(segment)
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    if len(errors) > ERRORS_SHOWN_MAX:
        parts.append(f"and {len(errors) - ERRORS_SHOWN_MAX} more errors")
    return "; ".join(parts)
