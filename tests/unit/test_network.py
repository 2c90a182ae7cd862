"""spec.network's mode and egress, the guest_egress setting, passt's and QEMU's argv, and what the
plan does with a VM's passt (docs/networking.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import Any

import pytest
from pydantic import ValidationError

from api.spec_fields import describe_validation_error
from api.types import Accel, Protocol, QemuVMSpec, canonical_spec
from controller.actions import (
    Action,
    AttachPasst,
    RemoveRuntimeDir,
    RequestPowerdown,
    Spawn,
    StartPasst,
    StopPasst,
)
from controller.model import Desired, Memory, Observed, ProcessObservation, QmpState, SidecarObservation
from controller.network import NetworkPolicy, network_problem
from controller.plan import Intent, LaunchContext, Plan, plan
from controller.qemu.argv import RuntimePaths
from controller.qemu.netargs import netdev_argv, passt_argv, passt_paths, socket_of
from controller.settings import ControllerSettings

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
UID = "0b7f3c52-93a4-4d0e-8b61-5a1f2c3d4e5f"
CONTEXT = LaunchContext(
    accel=Accel.TCG,
    runtime=RuntimePaths(PurePath("/data/run") / UID),
    images_dir=PurePath("/data/images"),
    disks_dir=PurePath("/data/disks") / UID,
)
PORTS = {(Protocol.TCP, 80): 25080, (Protocol.UDP, 53): 25053}
FORWARDS = [{"guestPort": 80}, {"guestPort": 53, "protocol": "udp"}]
PASST = {"mode": "passt", "forwards": FORWARDS}
ALLOWED = NetworkPolicy(guest_egress=True)


def spec(**network: Any) -> QemuVMSpec:
    return QemuVMSpec.model_validate({"boot": {"kernel": "tiny-guest/vmlinuz"}, "network": network})


def desired(**network: Any) -> Desired:
    return Desired(UID, "lab", "net", 1, spec(**network), None, False)


def observed(**fields: Any) -> Observed:
    base = {"process": None, "exit": None, "has_runtime_dir": True, "has_stale_runtime": False}
    return Observed(**(base | {"ports": dict(PORTS)} | fields))


def running(vm: Desired, *, qmp: QmpState = QmpState.RUNNING, **fields: Any) -> Observed:
    """`vm`'s QEMU running with the argv the plan would start it with now."""
    spawn = next(action for action in decide(vm, observed()).actions if isinstance(action, Spawn))
    return observed(process=ProcessObservation(4242, spawn.digest, NOW - timedelta(minutes=5), qmp), **fields)


def decide(vm: Desired, seen: Observed) -> Plan:
    return plan(vm, seen, Memory(), CONTEXT, now=NOW)


def types_of(actions: tuple[Action, ...]) -> list[type]:
    return [type(action) for action in actions]


# ---- the spec and the host's policy ---------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (
            {"egress": True},
            "network: egress needs mode passt: in mode user (SLIRP) the guest would "
            "reach the host's own 127.0.0.1 at 10.0.2.2",
        ),
        (
            {"mode": "passt", "egress": False},
            "network: mode passt always gives the guest egress: use mode user for a guest without it",
        ),
    ],
)
def test_egress_the_mode_cannot_honour_is_refused_by_name(network: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        spec(**network)
    assert message in describe_validation_error(caught.value)


def test_the_defaults_leave_the_canonical_spec_as_it_was() -> None:
    """mode user and an unset egress are left out, so stored specs keep their generation."""
    assert canonical_spec(spec(forwards=FORWARDS))["network"] == {
        "forwards": [
            {"protocol": "tcp", "guestPort": 80, "hostPort": None},
            {"protocol": "udp", "guestPort": 53, "hostPort": None},
        ]
    }
    assert canonical_spec(spec(mode="passt", egress=True))["network"] == {
        "forwards": [],
        "mode": "passt",
        "egress": True,
    }


def test_guest_egress_is_off_by_default() -> None:
    assert ControllerSettings.model_fields["guest_egress"].default is False
    assert NetworkPolicy() == NetworkPolicy(guest_egress=False, passt_problem="")


@pytest.mark.parametrize(
    ("network", "policy", "problem"),
    [
        ({}, NetworkPolicy(), ""),
        ({"mode": "passt"}, ALLOWED, ""),
        ({"mode": "passt", "egress": True}, ALLOWED, ""),
        (
            {"mode": "passt", "egress": True},
            NetworkPolicy(),
            "spec.network.egress: this host does not allow guests egress (setting guest_egress is off)",
        ),
        (
            {"mode": "passt"},
            NetworkPolicy(),
            "spec.network.mode passt gives the guest egress, which this host does not allow "
            "(setting guest_egress is off): use mode user",
        ),
        (
            {"mode": "passt"},
            NetworkPolicy(guest_egress=True, passt_problem="passt does not start (no user namespace)"),
            "spec.network.mode passt cannot run on this host: passt does not start (no user namespace)",
        ),
        # A user-mode guest never has egress, whatever the host allows.
        ({}, ALLOWED, ""),
    ],
)
def test_the_hosts_policy_decides_what_runs(
    network: dict[str, Any], policy: NetworkPolicy, problem: str
) -> None:
    assert network_problem(spec(**network), policy) == problem


# ---- argv -----------------------------------------------------------------------------------


def test_user_mode_is_restricted_slirp_with_hostfwds_on_the_forward_address() -> None:
    assert netdev_argv(spec(forwards=FORWARDS).network, PORTS, "127.0.0.1") == (
        "-netdev",
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:25080-:80,hostfwd=udp:127.0.0.1:25053-:53",
    )


def test_passt_maps_no_gateway_to_the_host_and_binds_forwards_on_the_forward_address() -> None:
    argv = passt_argv(spec(**PASST).network, PORTS, "127.0.0.1")
    socket = socket_of(argv)
    assert argv == (
        "passt",
        "--foreground",
        "--quiet",
        "--one-off",
        "--no-map-gw",
        "--socket",
        socket,
        "-t",
        "127.0.0.1/25080:80",
        "-u",
        "127.0.0.1/25053:53",
    )
    assert netdev_argv(spec(**PASST).network, PORTS, "127.0.0.1") == (
        "-netdev",
        f"stream,id=net0,server=off,addr.type=unix,addr.path=passt/{socket}",
    )
    assert passt_paths(CONTEXT.runtime) == RuntimePaths(CONTEXT.runtime.directory / "passt", program="passt")


def test_the_socket_name_follows_the_forwards_so_qemus_argv_changes_with_them() -> None:
    one = socket_of(passt_argv(spec(**PASST).network, PORTS, "127.0.0.1"))
    moved = socket_of(passt_argv(spec(**PASST).network, PORTS | {(Protocol.TCP, 80): 25081}, "127.0.0.1"))
    elsewhere = socket_of(passt_argv(spec(**PASST).network, PORTS, "127.0.0.2"))
    assert len({one, moved, elsewhere}) == 3
    assert len(f"passt/{one}") < 40  # far below sun_path's 107 bytes, whatever the data dir


# ---- the plan -------------------------------------------------------------------------------


def test_a_fresh_passt_is_started_right_before_qemu() -> None:
    decided = decide(desired(**PASST), observed())
    assert types_of(decided.actions)[-2:] == [StartPasst, Spawn]
    start = decided.actions[-2]
    assert isinstance(start, StartPasst)
    assert start.argv == passt_argv(spec(**PASST).network, PORTS, "127.0.0.1")


def test_user_mode_starts_no_passt_and_ends_one_left_from_mode_passt() -> None:
    assert types_of(decide(desired(forwards=FORWARDS), observed()).actions) == [Spawn]
    left = decide(desired(forwards=FORWARDS), observed(passt=SidecarObservation(77)))
    assert types_of(left.actions) == [StopPasst, Spawn]


def test_a_qemu_whose_passt_died_is_restarted_gracefully() -> None:
    vm = desired(**PASST)
    decided = decide(vm, running(vm))
    assert (decided.intent, decided.actions) == (Intent.RESTARTING, (RequestPowerdown(),))
    assert "lost its network" in decided.detail
    assert decide(vm, running(vm, passt=SidecarObservation(77))).intent is Intent.RUNNING


def test_a_passt_found_after_a_controller_restart_is_adopted() -> None:
    vm = desired(**PASST)
    decided = decide(vm, running(vm, passt=SidecarObservation(77, watched=False)))
    assert (decided.intent, decided.actions, decided.again) == (Intent.ADOPTING, (AttachPasst(77),), True)


def test_a_halted_or_deleted_vm_ends_its_passt() -> None:
    halted = Desired(
        UID,
        "lab",
        "net",
        1,
        QemuVMSpec.model_validate({"boot": {"kernel": "k"}, "runStrategy": "Halted", "network": PASST}),
        None,
        False,
    )
    assert decide(halted, observed(passt=SidecarObservation(77), ports={})).actions == (StopPasst(),)
    deleting = Desired(UID, "lab", "net", 1, spec(**PASST), None, True)
    assert decide(deleting, observed(passt=SidecarObservation(77), ports={})).actions == (
        StopPasst(),
        RemoveRuntimeDir(),
    )


def test_a_change_of_mode_restarts_the_vm() -> None:
    vm = desired(forwards=FORWARDS)
    switched = decide(desired(**PASST), running(vm, passt=SidecarObservation(77)))
    assert switched.intent is Intent.RESTARTING
