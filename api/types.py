"""The QemuVM API types (group tofu-qemu.dev, version v1alpha1).

A QemuVM manifest is what users write as the `input` of a `terraform_data` resource. The
models are frozen and forbid unknown fields, so a typo is a clear error and never silently
ignored. Every value that may reach a QEMU command line or a file path is constrained here by
an allow-list; the argv builder can then rely on it.

Sizes and durations accept friendly forms ("2Gi", "1m30s") and are normalised to integers, so
the canonical spec, and therefore `generation`, depends on meaning, not spelling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

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

from api import images, names, quantity

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
# cloud-init: AWS allows 16 KiB of user data; a seed ISO has room, a state file and a table less.
CLOUD_INIT_DATA_MAX = 64 * 1024
SSH_KEYS_MAX = 32
SSH_KEY_MAX = 8 * 1024
# A message lists this many validation errors and counts the rest.
ERRORS_SHOWN_MAX = 10


# The OpenAPI constraints each validator below enforces, by validator function. api/crd.py
# publishes them in the CRD and the served OpenAPI v3, so a schema-only client (an apiserver
# with crds/qemuvm.yaml, kubectl explain) refuses the same values. pydantic stays the authority:
# a constraint here may be looser than its validator (bytes vs characters), never stricter.
VALIDATOR_SCHEMAS: dict[Callable[..., Any], dict[str, Any]] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def _publishes(**constraints: Any) -> Callable[[_F], _F]:
    def register(function: _F) -> _F:
        VALIDATOR_SCHEMAS[function] = constraints
        return function

    return register


def _anchored(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )


@_publishes(maxLength=names.DNS_LABEL_MAX, pattern=_anchored(names.DNS_LABEL_PATTERN))
def _check_dns_label(value: str) -> str:
    problem = names.dns_label_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A file name inside the images dir, possibly in sub-folders. Every segment starts with a
# letter, digit or '_', so '..', '.hidden', '-option' and absolute paths cannot be written,
# and ',' / '=' (QEMU option syntax) are simply not in the alphabet.
_IMAGE_PATH_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*"
_IMAGE_PATH_RE = re.compile(_IMAGE_PATH_PATTERN)
_DIGEST_PATTERN = "[0-9a-f]{64}"
_URL_PATTERN = r"https?://\S+"


@_publishes(maxLength=IMAGE_PATH_MAX, pattern=_anchored(_IMAGE_PATH_PATTERN))
def _check_image_path(value: str) -> str:
    if len(value) > IMAGE_PATH_MAX:
        raise ValueError(f"must be at most {IMAGE_PATH_MAX} characters")
    if not _IMAGE_PATH_RE.fullmatch(value):
        raise ValueError(
            f"{value[:80]!r} must be a file name inside the images dir: letters, digits, "
            "'_', '.', '+', '-' and '/' between names; no '..', no leading '/', '.' or '-'"
        )
    return value


@_publishes(
    maxLength=max(images.URL_MAX, IMAGE_PATH_MAX),
    pattern=_anchored(images.SHA256_PREFIX + _DIGEST_PATTERN, _URL_PATTERN, _IMAGE_PATH_PATTERN),
)
def _check_image(value: str) -> str:
    """A file of the images dir, `sha256:<hex>` (the cache), or an http(s) URL."""
    if value.startswith(images.SHA256_PREFIX):
        problem = images.digest_problem(value.removeprefix(images.SHA256_PREFIX))
        if problem:
            raise ValueError(f"sha256: image: {problem}")
        return value
    if images.is_url(value):
        problem = images.url_problem(value)
        if problem:
            raise ValueError(problem)
        return value
    return _check_image_path(value)


# `.lower()` comes first: "SHA256:" and upper-case hex are accepted.
@_publishes(pattern=_anchored("([sS][hH][aA]256:)?[0-9a-fA-F]{64}"))
def _check_digest(value: str) -> str:
    value = value.lower().removeprefix(images.SHA256_PREFIX)
    problem = images.digest_problem(value)
    if problem:
        raise ValueError(problem)
    return value


@_publishes(maxLength=CLOUD_INIT_DATA_MAX)
def _check_cloud_init_text(value: str) -> str:
    if len(value.encode()) > CLOUD_INIT_DATA_MAX:
        raise ValueError(f"must be at most {CLOUD_INIT_DATA_MAX // 1024} KiB")
    if "\x00" in value:
        raise ValueError("may not contain NUL characters")
    return value


def _check_cloud_init_object(value: dict[str, Any]) -> dict[str, Any]:
    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError) as err:
        raise ValueError(f"must be plain JSON data: {err}") from None
    if size > CLOUD_INIT_DATA_MAX:
        raise ValueError(f"must be at most {CLOUD_INIT_DATA_MAX // 1024} KiB as JSON")
    return value


_SSH_KEY_PATTERN = r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [ -~]*)?"
_SSH_KEY_RE = re.compile(_SSH_KEY_PATTERN)


@_publishes(maxLength=SSH_KEY_MAX, pattern=r"^\s*" + _SSH_KEY_PATTERN + r"\s*$")
def _check_ssh_key(value: str) -> str:
    if len(value) > SSH_KEY_MAX:
        raise ValueError(f"an SSH key may be at most {SSH_KEY_MAX} characters")
    if not _SSH_KEY_RE.fullmatch(value.strip()):
        raise ValueError(
            f'{value[:40]!r}... is not an OpenSSH public key line ("ssh-ed25519 AAAA... comment")'
        )
    return value.strip()


@_publishes(maxLength=CMDLINE_MAX, pattern="^[ -~]*$")
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

    VALIDATOR_SCHEMAS[check] = {"minimum": low, "maximum": high}
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
ImageRef = Annotated[str, AfterValidator(_check_image)]
Sha256Digest = Annotated[str, AfterValidator(_check_digest)]
CloudInitText = Annotated[str, AfterValidator(_check_cloud_init_text)]
CloudInitObject = Annotated[dict[str, Any], AfterValidator(_check_cloud_init_object)]
SshAuthorizedKey = Annotated[str, AfterValidator(_check_ssh_key)]
KernelCmdline = Annotated[str, AfterValidator(_check_cmdline)]
MemoryMiB = Annotated[
    int,
    BeforeValidator(quantity.parse_mebibytes, json_schema_input_type=int | str),
    _in_range(MEMORY_MIN_MIB, MEMORY_MAX_MIB, " MiB"),
]
DiskMiB = Annotated[
    int,
    BeforeValidator(quantity.parse_mebibytes, json_schema_input_type=int | str),
    _in_range(1, DISK_MAX_MIB, " MiB"),
]
Seconds = Annotated[
    int,
    BeforeValidator(quantity.parse_seconds, json_schema_input_type=int | str),
    _in_range(0, STOP_TIMEOUT_MAX_SECONDS, " s"),
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


class StartStrategy(StrEnum):
    """How each QEMU of the VM starts (KubeVirt's startStrategy)."""

    RUNNING = "Running"
    # Started with -S and never continued until `tofu-qemu unpause`: no guest code runs.
    PAUSED = "Paused"


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
    """A disk: a qcow2 overlay on `image`, or a blank qcow2 disk if there is no image."""

    name: DnsLabel
    image: ImageRef | None = Field(
        default=None,
        description="A file in the images dir, sha256:<hex> (the download cache), or an http(s) URL",
    )
    sha256: Sha256Digest | None = Field(
        default=None,
        description="The URL image's sha256; without it, <url>.sha256 is read. Only for URL images",
    )
    size: DiskMiB | None = Field(default=None, description='MiB, or a quantity like "10Gi"')
    reclaim_policy: ReclaimPolicy = ReclaimPolicy.DELETE

    @model_validator(mode="after")
    def _needs_image_or_size(self) -> DiskSpec:
        if self.image is None and self.size is None:
            raise ValueError("a disk needs an image, a size, or both")
        if self.sha256 is not None and (self.image is None or not images.is_url(self.image)):
            raise ValueError("sha256 applies to URL images only (a sha256:<hex> image names its own)")
        return self

    @property
    def source(self) -> images.ImageSource | None:
        return images.image_source(self.image, self.sha256) if self.image is not None else None


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


class FirmwareType(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"


class FirmwareSpec(_Model):
    """The guest's firmware: SeaBIOS, or OVMF (UEFI) with a per-VM NVRAM vars file (docs/firmware.md)."""

    type: FirmwareType = FirmwareType.BIOS
    secure_boot: bool = Field(
        default=False, description="OVMF's secure-boot build with Microsoft's keys enrolled; needs q35"
    )
    reclaim_policy: ReclaimPolicy = Field(
        default=ReclaimPolicy.DELETE, description="What happens to the NVRAM vars file when the VM is deleted"
    )


class TpmSpec(_Model):
    """A TPM 2.0 emulated by a per-VM swtpm."""

    persistent: bool = Field(default=False, description="Keep the TPM's state across restarts of the VM")


class CloudInitSpec(_Model):
    """A NoCloud seed (a `cidata` CD-ROM) for images that run cloud-init."""

    user_data: CloudInitText | CloudInitObject | None = Field(
        default=None, description="user-data: text as it is, or an object written as #cloud-config"
    )
    meta_data: CloudInitObject = Field(
        default_factory=dict, description="meta-data keys; instance-id and local-hostname are set"
    )
    network_config: CloudInitObject | None = Field(
        default=None, description="network-config (version 1 or 2), as an object"
    )
    ssh_authorized_keys: Annotated[tuple[SshAuthorizedKey, ...], _at_most(SSH_KEYS_MAX, "SSH keys")] = Field(
        default=(), max_length=SSH_KEYS_MAX, description="Public keys for the default user"
    )


# instancetypes: references to instance types and preferences (api/instancetypes.py,
# docs/instancetypes.md). Their names may hold dots ("u1.small"), as KubeVirt's do.
INSTANCE_TYPE_KIND = "QemuInstanceType"
CLUSTER_INSTANCE_TYPE_KIND = "QemuClusterInstanceType"
PREFERENCE_KIND = "QemuPreference"
CLUSTER_PREFERENCE_KIND = "QemuClusterPreference"
TYPE_NAME_MAX = 63
TYPE_NAME_PATTERN = "[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?"
_TYPE_NAME_RE = re.compile(TYPE_NAME_PATTERN)


@_publishes(maxLength=TYPE_NAME_MAX, pattern=_anchored(TYPE_NAME_PATTERN))
def check_type_name(value: str) -> str:
    if not _TYPE_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value[: names.QUOTED_MAX]!r} must be at most {TYPE_NAME_MAX} lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit"
        )
    return value


TypeName = Annotated[str, AfterValidator(check_type_name)]


class InstanceTypeRef(_Model):
    """`spec.instanceType`: a QemuInstanceType of the VM's project, or a cluster-wide one."""

    name: TypeName
    kind: Literal["QemuInstanceType", "QemuClusterInstanceType"] = "QemuInstanceType"


class PreferenceRef(_Model):
    """`spec.preference`: a QemuPreference of the VM's project, or a cluster-wide one."""

    name: TypeName
    kind: Literal["QemuPreference", "QemuClusterPreference"] = "QemuPreference"


class QemuVMSpec(_Model):
    """The desired state of one VM. Defaults are part of the canonical form (canonical_spec)."""

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
    cloud_init: CloudInitSpec | None = None
    firmware: FirmwareSpec = FirmwareSpec()
    tpm: TpmSpec | None = None
    stop_timeout: Seconds = Field(default=30, description='seconds, or a duration like "2m"')
    # Pause (docs/controller.md): not part of argv, so changing it restarts nothing.
    start_strategy: StartStrategy = Field(
        default=StartStrategy.RUNNING,
        description="Paused: every QEMU of the VM starts paused, until `tofu-qemu unpause`",
    )
    instance_type: InstanceTypeRef | None = Field(
        default=None, description="Takes cpus and memory from this type; the VM may not set them"
    )
    preference: PreferenceRef | None = Field(
        default=None, description="Defaults for machine, accel, runStrategy, stopTimeout and cloudInit"
    )
    # Left out of the canonical form when empty, so specs stored before it existed keep their
    # hash (a changed hash is a new generation).
    node_selector: Labels = Field(
        default_factory=dict,
        description="Labels a host must have to run this VM (docs/multi-host.md)",
        exclude_if=lambda selector: not selector,
    )

    @model_validator(mode="after")
    def _bootable_and_unique_disks(self) -> QemuVMSpec:
        if self.boot is None and not any(disk.image for disk in self.disks):
            raise ValueError("nothing to boot: set boot.kernel or give a disk an image")
        disk_names = [disk.name for disk in self.disks]
        duplicates = sorted({name for name in disk_names if disk_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"disk names must be unique: {', '.join(duplicates)} repeated")
        return self

    @model_validator(mode="after")
    def _firmware_fits_the_machine(self) -> QemuVMSpec:
        """Combinations QEMU or OVMF cannot run, named in one message (a Valid=False condition)."""
        problems = []
        uefi = self.firmware.type is FirmwareType.UEFI
        if self.firmware.secure_boot and not uefi:
            problems.append("firmware.secureBoot needs firmware.type uefi")
        if self.firmware.secure_boot and self.machine is not Machine.Q35:
            problems.append(f"firmware.secureBoot needs machine q35 (SMM), not {self.machine.value}")
        elif uefi and self.machine is Machine.MICROVM:
            problems.append("firmware.type uefi needs machine q35: microvm has no flash for OVMF")
        if self.tpm is not None and self.machine is Machine.MICROVM:
            problems.append("tpm needs machine q35: microvm has no TPM interface")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# The fields an instance type or a preference may provide (api/instancetypes.py).
TYPE_FIELDS = ("cpus", "memory")
PREFERENCE_FIELDS = ("machine", "accel", "run_strategy", "stop_timeout", "cloud_init")


def canonical_spec(spec: QemuVMSpec) -> dict[str, Any]:
    """The spec as stored: every default written out, so `generation` follows meaning.

    A VM that references an instance type or a preference keeps only the fields it set among
    those they provide: the controller fills the rest from the type's frozen revision, and a
    field the VM set is then told apart from a default (docs/instancetypes.md).
    """
    exclude = {name for name in ("instance_type", "preference") if getattr(spec, name) is None}
    typed = spec.instance_type is not None or spec.preference is not None
    if typed:
        exclude |= set(TYPE_FIELDS + PREFERENCE_FIELDS) - spec.model_fields_set
    dumped = spec.model_dump(mode="json", by_alias=True, exclude=exclude)
    if typed and spec.cloud_init is not None and "cloudInit" in dumped:
        # Merged key by key with a preference's: only the keys the VM wrote.
        dumped["cloudInit"] = spec.cloud_init.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return dumped


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
    # QEMU runs, its vCPUs stopped (QMP `stop`: `tofu-qemu pause`, or from outside).
    PAUSED = "Paused"
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


class RunOverride(_Model):
    """Imperative requests (`tofu-qemu stop|start|restart|pause|unpause`, the dashboard). They
    override the spec's runStrategy without touching the Terraform-owned spec; `start` clears a
    stop."""

    stopped: bool = False
    # A restart is wanted of any QEMU started before this time.
    restart_requested_at: datetime | None = None
    # A pause is wanted of the QEMU started before this time (a new QEMU runs: controller/pausing.py).
    pause_requested_at: datetime | None = None
    # An unpause: `cont` of a QEMU paused before this time, whoever paused it.
    unpause_requested_at: datetime | None = None
    requested_by: str = ""
    updated_at: datetime
    # instancetypes: `tofu-qemu rollout` moves the VM to its types' current revisions.
    rollout_requested_at: datetime | None = None


class FrozenRevision(_Model):
    """An instance type's or a preference's content as the VM took it (KubeVirt keeps it in a
    ControllerRevision): later changes to the type reach the VM only by a rollout or a spec change."""

    kind: str
    name: str
    revision: str = Field(description="A digest of `spec`: equal revisions mean equal content")
    spec: dict[str, Any]
    generation: int = Field(description="The VM generation this revision was taken for")
    taken_at: datetime


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
    paused_since: datetime | None = Field(
        default=None, description="When the controller first saw this QEMU paused (None: not paused)"
    )
    # Shown by the API from the store's override column; the controller never writes it.
    override: RunOverride | None = None
    # instancetypes: the revisions the VM runs (docs/instancetypes.md#revisions).
    instance_type: FrozenRevision | None = None
    preference: FrozenRevision | None = None
    # Shown by the API from the store's host column (docs/multi-host.md); set by the scheduler.
    host: str | None = Field(default=None, description="The host the VM is placed on, for its whole life")


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
    resource_version: str = Field(
        default="0", description="Changes with every change of the object (store-wide, as in Kubernetes)"
    )

    namespace: str = Field(default="", description="The project, under the name Kubernetes tools expect")

    @model_validator(mode="before")
    @classmethod
    def _namespace_defaults_to_the_project(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("namespace"):
            return {**data, "namespace": data.get("project", "")}
        return data

    @model_validator(mode="after")
    def _namespace_is_the_project(self) -> ObjectMeta:
        if self.namespace != self.project:
            raise ValueError("metadata.namespace must equal metadata.project")
        return self


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
