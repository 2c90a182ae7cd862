"""The actions a plan may contain. Data only: the executor performs them, in order.

Each docstring says when the action is legal; `plan` only emits it then.
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass
from pathlib import PurePath

from api.images import RemoteImage
from api.types import DiskSpec, ReclaimPolicy
from controller.model import PortKey


@dataclass(frozen=True, slots=True)
class AllocatePorts:
    """Reserve host ports for forwards that have none. Legal while the VM should run.

    `requested` maps a forward to the host port the spec asks for, or None for "any free one".
    """

    requested: tuple[tuple[PortKey, int | None], ...]


@dataclass(frozen=True, slots=True)
class ReleasePorts:
    """Free host ports. Legal only when no process of this VM is running."""

    keys: tuple[PortKey, ...]


@dataclass(frozen=True, slots=True)
class FetchImage:
    """Start downloading a base image into the cache (or join the download running). Returns at
    once; the VM is woken when it ends. Legal any time."""

    source: RemoteImage


@dataclass(frozen=True, slots=True)
class CreateDisk:
    """Create the qcow2 overlay on `base` (or a blank disk) for `disk`, or adopt the retained disk
    of a gone VM of the same name. Legal before spawning, once the base image is at hand."""

    disk: DiskSpec
    base: PurePath | None
    project: str
    vm_name: str


@dataclass(frozen=True, slots=True)
class GrowDisk:
    """`qemu-img resize` the disk up to `size_mib`. Legal only when no process of this VM runs."""

    name: str
    path: PurePath
    size_mib: int


@dataclass(frozen=True, slots=True)
class DeleteDisk:
    """Delete a disk file and its record. Legal only when no process of this VM is running."""

    name: str
    path: PurePath


@dataclass(frozen=True, slots=True)
class WriteSeed:
    """Write the cloud-init NoCloud seed ISO at `path` (and remove older seeds). Legal before
    spawning."""

    path: PurePath
    # (file name, content) pairs, sorted by name.
    files: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class PrepareNvram:
    """Copy OVMF's vars `template` to `path`, the VM's NVRAM, recorded in the disk ledger as
    `name` (or adopt the retained NVRAM of a gone VM of the same name). Legal before spawning."""

    name: str
    template: PurePath
    path: PurePath
    reclaim_policy: ReclaimPolicy
    project: str
    vm_name: str


@dataclass(frozen=True, slots=True)
class StartTpm:
    """Start the VM's swtpm (ending one left over first), and return once its socket listens.
    Without `persistent`, the TPM's state is wiped first. Legal only when no QEMU of it runs."""

    persistent: bool


@dataclass(frozen=True, slots=True)
class AttachTpm:
    """Watch `pid`, the VM's live swtpm nobody watches yet (found after a controller restart)."""

    pid: int


@dataclass(frozen=True, slots=True)
class StopTpm:
    """End the VM's swtpm. Legal only when no QEMU of it runs."""


@dataclass(frozen=True, slots=True)
class StartPasst:
    """Start the VM's passt with `argv` (ending one left over first), and return once its socket
    exists (docs/networking.md). Legal only when no QEMU of it runs."""

    argv: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AttachPasst:
    """Watch `pid`, the VM's live passt nobody watches yet (found after a controller restart)."""

    pid: int


@dataclass(frozen=True, slots=True)
class StopPasst:
    """End the VM's passt. Legal only when no QEMU of it runs."""


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start QEMU paused with `argv`. Legal only when no process of this VM exists.

    With `resume`, `cont` it as soon as QMP is connected: what the next pass would plan at
    once, done without that pass (the bare spawn-connect-cont that hack/bench/converge
    compares with). A `cont` that fails is left to the next pass, which sees the guest still
    in prelaunch and plans Continue."""

    argv: tuple[str, ...]
    digest: str
    resume: bool = False


@dataclass(frozen=True, slots=True)
class Continue:
    """QMP `cont`: run a paused guest. Legal when our process is paused and should run."""


@dataclass(frozen=True, slots=True)
class Pause:
    """QMP `stop`: pause a running guest (its vCPUs stop; QEMU lives on). Legal when our
    process runs and a pause was asked for it."""


@dataclass(frozen=True, slots=True)
class Unpause:
    """QMP `cont` of a guest paused after it ran. Legal when our process is paused and an
    unpause was asked after it was seen paused."""


@dataclass(frozen=True, slots=True)
class RequestPowerdown:
    """QMP `system_powerdown`: ask the guest to shut down (the ACPI button)."""


@dataclass(frozen=True, slots=True)
class RequestGuestShutdown:
    """guest-shutdown through the guest agent (docs/guest-agent.md): the guest's own orderly
    power-off. Legal when the agent answered its last ask."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QMP `quit`: end QEMU at once, after the guest ignored the power button."""


@dataclass(frozen=True, slots=True)
class Kill:
    """Send `signal` to our process `pid` (checked to be ours just before sending)."""

    pid: int
    signal: int = signals.SIGKILL


@dataclass(frozen=True, slots=True)
class KillLost:
    """SIGKILL `pid`, a QEMU of this VM that can no longer be managed: its runtime dir (with the
    launch record and QMP socket) is gone. Checked again just before sending."""

    pid: int


@dataclass(frozen=True, slots=True)
class Attach:
    """Watch `pid`, a live process of ours nobody watches yet (found after a controller
    restart): its exit and events reach the controller from then on. Adoption is this."""

    pid: int


@dataclass(frozen=True, slots=True)
class RecordExit:
    """Record the exit of `pid`, which died while no controller watched it, so the exit is
    counted (once) by the next plan. Legal only when that process is gone."""

    pid: int


@dataclass(frozen=True, slots=True)
class CleanRuntime:
    """Remove what a dead process left (pidfile, socket, launch and exit records).

    Legal only when no process of this VM is running.
    """


@dataclass(frozen=True, slots=True)
class RemoveRuntimeDir:
    """Remove DATA/run/<uid>/ entirely. Legal only when no process of this VM is running."""


@dataclass(frozen=True, slots=True)
class Finalize:
    """Remove the object from the store. Legal last, once nothing is held any more."""


Action = (
    AllocatePorts
    | ReleasePorts
    | FetchImage
    | CreateDisk
    | GrowDisk
    | DeleteDisk
    | WriteSeed
    | PrepareNvram
    | StartTpm
    | AttachTpm
    | StopTpm
    | StartPasst
    | AttachPasst
    | StopPasst
    | Spawn
    | Continue
    | Pause
    | Unpause
    | RequestPowerdown
    | RequestGuestShutdown
    | Quit
    | Kill
    | KillLost
    | Attach
    | RecordExit
    | CleanRuntime
    | RemoveRuntimeDir
    | Finalize
)
