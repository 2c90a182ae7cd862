"""What the reconciler knows about one VM: the desired object, and what it observed.

Plain frozen values; `plan` and `compute_status` decide from these alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import PurePath

from api.guest_types import GuestStatus
from api.types import LastExit, Protocol, QemuVMSpec, ReclaimPolicy, RunOverride
from controller.admission import ADMITTED, Admission

PortKey = tuple[Protocol, int]


@dataclass(frozen=True, slots=True)
class Desired:
    """The spec-store object for one uid. `spec` is None when the spec is invalid."""

    uid: str
    project: str
    name: str
    generation: int
    spec: QemuVMSpec | None
    spec_error: str | None
    deleting: bool
    # Whether the fleet's quotas let this VM start (controller/admission.py).
    admission: Admission = ADMITTED
    # Imperative stop/start/restart requests (the API's, not the spec's).
    override: RunOverride | None = None

    @property
    def stopped_by_request(self) -> bool:
        return self.override is not None and self.override.stopped

    @property
    def restart_requested_at(self) -> datetime | None:
        return self.override.restart_requested_at if self.override is not None else None

    @property
    def pause_requested_at(self) -> datetime | None:
        return self.override.pause_requested_at if self.override is not None else None

    @property
    def unpause_requested_at(self) -> datetime | None:
        return self.override.unpause_requested_at if self.override is not None else None


class QmpState(StrEnum):
    """The guest's run state as QMP `query-status` reports it, or why it could not."""

    RUNNING = "running"
    # Started with -S and never continued (or an incoming migration): the controller's own pause.
    PRELAUNCH = "prelaunch"
    # Paused after it ran: QMP `stop` (ours on request, or from outside), or QEMU itself.
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    PANICKED = "guest-panicked"
    OTHER = "other"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class ProcessObservation:
    """A live QEMU process proven ours: pidfile, /proc start time and cmdline all agree."""

    pid: int
    argv_digest: str
    started_at: datetime
    qmp: QmpState
    # Its runtime dir and QMP socket still exist: without them it cannot be managed (no QMP
    # after a controller restart, no launch record to adopt it by).
    runtime_intact: bool = True
    # The guest has booted far enough to bring up its network card (QMP NIC_RX_FILTER_CHANGED,
    # or query-rx-filter for an adopted process): before that it ignores the power button.
    guest_booted: bool = True
    # The hypervisor watches it (its exit and events): false for a process found after a
    # controller restart, until it is attached.
    watched: bool = True
    # Its guest agent answered the last ask (docs/guest-agent.md): guest-shutdown can work.
    agent_connected: bool = False


@dataclass(frozen=True, slots=True)
class SidecarObservation:
    """A VM's live helper process (its swtpm, its passt), proven ours by its launch record and
    /proc (controller/qemu/sidecar.py)."""

    pid: int
    # Its exit wakes the VM: false for one found after a controller restart, until attached.
    watched: bool = True


TpmObservation = SidecarObservation


@dataclass(frozen=True, slots=True)
class ExitObservation:
    """An exit recorded in the runtime dir by the process watcher."""

    at: datetime
    exit_code: int | None
    signal: int | None
    guest_shutdown: bool
    started_at: datetime | None
    stderr_tail: str = ""


class ImageState(StrEnum):
    """Where a base image from the cache or a URL stands (controller/images/)."""

    READY = "Ready"
    # Not in the cache and not being fetched: a fetch may start (URL) or nothing can (sha256:).
    MISSING = "Missing"
    FETCHING = "Fetching"
    # The last fetch failed; no new one starts before `retry_at`.
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class ImageLookup:
    """What the image cache knows of one source, without touching the network."""

    state: ImageState
    # The cached file, when READY.
    path: PurePath | None = None
    # A condition reason when not READY: ImageNotFound, ImageDownloading,
    # ImageChecksumMismatch, ImageDownloadFailed.
    reason: str = ""
    message: str = ""
    retry_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DiskRecord:
    name: str
    reclaim_policy: ReclaimPolicy
    exists: bool
    path: PurePath
    # MiB as created or last grown; None when unknown (recorded by an older version).
    size_mib: int | None = None


@dataclass(frozen=True, slots=True)
class Storage:
    """The filesystem of the disks dir (statvfs): its size, and the space still free for us."""

    total_mib: int
    available_mib: int


@dataclass(frozen=True, slots=True)
class Observed:
    process: ProcessObservation | None
    exit: ExitObservation | None
    has_runtime_dir: bool
    # Files left by a process that is gone (pidfile, socket, launch record).
    has_stale_runtime: bool
    # Our process is between its leader turning zombie and its last thread exiting: the pidfd
    # has not fired, the exit is not recorded yet, and the runtime lock is still held.
    exiting: bool = False
    ports: Mapping[PortKey, int] = field(default_factory=dict)
    disks: Mapping[str, DiskRecord] = field(default_factory=dict)
    # Boot files (kernel, initrd) that are unusable; looked at only when no process runs.
    missing_images: tuple[str, ...] = ()
    # Base images of the disks that have no file yet, by disk name.
    bases: Mapping[str, ImageLookup] = field(default_factory=dict)
    # A QEMU of this VM that lost its runtime dir (looked for only when one was expected).
    lost_pid: int | None = None
    # A process of ours that died while nobody watched it, its exit not recorded yet.
    unrecorded_exit_pid: int | None = None
    # MemAvailable of the host, looked at only when no process runs (None: unknown).
    host_memory_available_mib: int | None = None
    # The disks dir's filesystem, looked at when the spec has sized disks (None: unknown).
    storage: Storage | None = None
    # Firmware and TPM (docs/firmware.md): the live swtpm, and OVMF files that are not there
    # (looked at only when no process runs).
    tpm: TpmObservation | None = None
    missing_firmware: tuple[str, ...] = ()
    # What the guest agent last reported (controller/guest_agents.py), for a running process.
    guest: GuestStatus | None = None
    # The VM's passt, in network mode passt (docs/networking.md).
    passt: SidecarObservation | None = None


@dataclass(frozen=True, slots=True)
class Memory:
    """What status remembers across reconciles and controller restarts."""

    restarts: int = 0
    failures: int = 0
    last_exit: LastExit | None = None
    next_retry_at: datetime | None = None
    stop_requested_at: datetime | None = None
    # When this QEMU was first seen paused (controller/pausing.py); None while it runs.
    paused_since: datetime | None = None
