"""What `plan` and admission decide about a VM's network. Pure (docs/networking.md).

- Egress: a spec may have it only where the server's `guest_egress` allows it, and only in mode
  passt (api/types.py refuses egress in mode user); anything else is Valid=False, naming why.
- passt: one per QEMU, started just before it and gone with it (`--one-off`). A QEMU whose passt
  died has lost its network and is restarted; a passt without a QEMU is ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from api.types import NetworkMode, QemuVMSpec
from controller.actions import Action, AttachPasst, StartPasst, StopPasst
from controller.model import Observed, SidecarObservation
from controller.qemu.argv import RuntimePaths
from controller.qemu.netargs import passt_argv


class PasstFailed(Exception):
    """passt could not be started (missing, or it exited); the message says why. Retry later."""


class PasstNetworks(Protocol):
    """The VMs' passt processes (controller/qemu/passt.py). `paths` is the VM's runtime dir."""

    async def inspect(self, uid: str, paths: RuntimePaths) -> SidecarObservation | None:
        """The VM's live passt proven ours, or None. Changes nothing."""
        ...

    async def start(self, uid: str, paths: RuntimePaths, argv: tuple[str, ...]) -> None:
        """End a passt left over, start `argv` and return when its socket exists.
        :raise PasstFailed: it cannot start."""
        ...

    async def attach(self, uid: str, paths: RuntimePaths, pid: int) -> None:
        """Watch `pid` (adoption after a restart): its exit wakes the VM."""
        ...

    async def stop(self, uid: str, paths: RuntimePaths) -> None:
        """End the VM's passt, if it runs. Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """The host's side of a spec's network: the `guest_egress` setting, and why passt cannot
    run here ("" when it can; probed at start-up by controller/qemu/passt.py)."""

    guest_egress: bool = False
    passt_problem: str = ""


def egress_wanted(spec: QemuVMSpec, policy: NetworkPolicy) -> bool:
    """The spec's egress, or the host's default for its mode (none in mode user)."""
    if spec.network.egress is not None:
        return spec.network.egress
    return policy.guest_egress and spec.network.mode is NetworkMode.PASST


def network_problem(spec: QemuVMSpec, policy: NetworkPolicy) -> str:
    """Why `spec`'s network cannot run on this host ("" when it can), naming the setting."""
    passt = spec.network.mode is NetworkMode.PASST
    if passt and policy.passt_problem:
        return f"spec.network.mode passt cannot run on this host: {policy.passt_problem}"
    if egress_wanted(spec, policy) and not policy.guest_egress:
        return "spec.network.egress: this host does not allow guests egress (setting guest_egress is off)"
    if passt and not egress_wanted(spec, policy):
        return (
            "spec.network.mode passt gives the guest egress, which this host does not allow "
            "(setting guest_egress is off): use mode user"
        )
    return ""


def adopt_passt(observed: Observed) -> tuple[Action, ...]:
    """A live passt nobody watches (found after a controller restart) is attached."""
    passt = observed.passt
    return (AttachPasst(passt.pid),) if passt is not None and not passt.watched else ()


def passt_before_spawn(spec: QemuVMSpec, observed: Observed, address: str) -> tuple[Action, ...]:
    """A fresh passt for the QEMU about to start, or the end of one the spec no longer wants."""
    if spec.network.mode is NetworkMode.PASST:
        return (StartPasst(passt_argv(spec.network, observed.ports, address)),)
    return (StopPasst(),) if observed.passt is not None else ()


def stray_passt(observed: Observed) -> tuple[Action, ...]:
    """A passt without its QEMU serves nobody: it is ended."""
    return (StopPasst(),) if observed.passt is not None and observed.process is None else ()


def lost_passt(spec: QemuVMSpec, observed: Observed) -> str:
    """Why a running QEMU must restart for its network, or ""."""
    if spec.network.mode is NetworkMode.PASST and observed.process is not None and observed.passt is None:
        return "its passt is gone, so the guest lost its network: restarting"
    return ""
