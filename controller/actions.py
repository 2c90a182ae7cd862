"""The actions a plan may contain. Data only: the executor performs them, in order.

Each docstring says when the action is legal; `plan` only emits it then.
"""

from __future__ import annotations

import signal as signals
from dataclasses import dataclass

from api.types import DiskSpec
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
class CreateDisk:
    """Create the qcow2 overlay (or blank disk) for `disk`. Legal before spawning."""

    disk: DiskSpec


@dataclass(frozen=True, slots=True)
class DeleteDisk:
    """Delete a disk file and its record. Legal only when no process of this VM is running."""

    name: str


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start QEMU paused with `argv`. Legal only when no process of this VM exists."""

    argv: tuple[str, ...]
    digest: str


@dataclass(frozen=True, slots=True)
class Continue:
    """QMP `cont`: run a paused guest. Legal when our process is paused and should run."""


@dataclass(frozen=True, slots=True)
class RequestPowerdown:
    """QMP `system_powerdown`: ask the guest to shut down (the ACPI button)."""


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
    | CreateDisk
    | DeleteDisk
    | Spawn
    | Continue
    | RequestPowerdown
    | Quit
    | Kill
    | KillLost
    | CleanRuntime
    | RemoveRuntimeDir
    | Finalize
)
