"""What a plan is: its intent, the launch context it decides in, and the plan itself (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import PurePath

from api.types import Accel
from controller.actions import Action
from controller.model import Memory
from controller.qemu.argv import RuntimePaths


class Intent(StrEnum):
    """What the plan is working towards; status turns it into a phase and conditions."""

    INVALID = "Invalid"
    DELETING = "Deleting"
    STOPPING = "Stopping"
    RESTARTING = "Restarting"
    HALTED = "Halted"
    FINISHED = "Finished"
    # The controller is exiting with stop_vms_on_exit: stop, start nothing.
    SHUTTING_DOWN = "ShuttingDown"
    # The spec asks for what cannot be done (shrinking a disk); whatever runs keeps running.
    REFUSED = "Refused"
    PREPARING = "Preparing"
    WAITING_FOR_IMAGES = "WaitingForImages"
    QUOTA_EXCEEDED = "QuotaExceeded"
    HOST_MEMORY_LOW = "HostMemoryLow"
    INSUFFICIENT_STORAGE = "InsufficientStorage"
    BACKING_OFF = "BackingOff"
    STARTING = "Starting"
    RUNNING = "Running"
    # QEMU lives with its guest paused (controller/pausing.py).
    PAUSED = "Paused"
    # Bookkeeping before any decision: attach a process nobody watches, record an exit nobody
    # recorded. Status stays as it was; the next reconcile (at once) decides.
    ADOPTING = "Adopting"


@dataclass(frozen=True, slots=True)
class LaunchContext:
    """Environment facts the argv depends on, resolved by the reconciler before planning."""

    accel: Accel
    runtime: RuntimePaths
    images_dir: PurePath
    disks_dir: PurePath
    # A start must leave the host at least this much available memory.
    memory_reserve_mib: int = 0
    # Creating and growing a VM's disks must leave at least this much free once they are full.
    storage_reserve_mib: int = 0
    # How often a running VM is looked at (its QMP asked) between other events; None: never.
    liveness_period: timedelta | None = None
    forward_address: str = "127.0.0.1"
    shutting_down: bool = False

    def disk_path(self, name: str) -> PurePath:
        return self.disks_dir / f"{name}.qcow2"

    def seed_path(self, digest: str) -> PurePath:
        return self.runtime.directory / f"cidata-{digest}.iso"


@dataclass(frozen=True, slots=True)
class Plan:
    intent: Intent
    memory: Memory
    actions: tuple[Action, ...] = ()
    requeue_after: timedelta | None = None
    # Plan again right after executing: these actions changed the inputs of the next step.
    again: bool = False
    detail: str = ""
    # The condition reason for a waiting or refusing intent, when the intent's name is too vague.
    reason: str = ""
