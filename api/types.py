"""The QemuVM API types (group tofu-qemu.dev, version v1alpha1).

A QemuVM manifest is what users write as the `input` of a `terraform_data` resource. The
models are frozen and forbid unknown fields, so a typo is a clear error and never silently
ignored. Every value that may reach a QEMU command line or a file path is constrained here by
an allow-list; the argv builder can then rely on it.

Sizes and durations accept friendly forms ("2Gi", "1m30s") and are normalised to integers, so
the canonical spec, and therefore `generation`, depends on meaning, not spelling.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from api import images, names
from api.guest_types import GuestStatus, no_schema_default
from api.network_spec import NetworkMode as NetworkMode
from api.network_spec import NetworkSpec as NetworkSpec
from api.network_spec import PortForward as PortForward
from api.network_spec import Protocol as Protocol
from api.spec_fields import (
    DISKS_MAX,
    SSH_KEYS_MAX,
    CloudInitObject,
    CloudInitText,
    CpuCount,
    DiskMiB,
    DnsLabel,
    ImagePath,
    ImageRef,
    KernelCmdline,
    MemoryMiB,
    Seconds,
    Sha256Digest,
    SshAuthorizedKey,
    TypeName,
    at_most,
)
from api.spec_model import SpecModel as _Model

API_GROUP = "tofu-qemu.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "QemuVM"


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
    ssh_authorized_keys: Annotated[tuple[SshAuthorizedKey, ...], at_most(SSH_KEYS_MAX, "SSH keys")] = Field(
        default=(), max_length=SSH_KEYS_MAX, description="Public keys for the default user"
    )


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
    disks: Annotated[tuple[DiskSpec, ...], at_most(DISKS_MAX, "disks")] = Field(
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
    # Guest agent (docs/guest-agent.md); left out of the canonical form when off, like nodeSelector.
    guest_agent: bool = Field(
        default=False,
        description="A qemu-ga channel: guest info in status, shutdown",
        exclude_if=lambda on: not on,
        json_schema_extra=no_schema_default,
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


Labels = Annotated[dict[str, str], at_most(names.LABELS_MAX, "labels"), AfterValidator(_check_labels)]


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
    guest: GuestStatus | None = None  # what qemu-ga reports (docs/guest-agent.md)


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
