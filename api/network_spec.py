"""spec.network of a QemuVM: the forwards, the mode and egress (docs/networking.md).

Part of api/types.py, which re-exports every name here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from api.spec_fields import FORWARDS_MAX, Port, UnprivilegedPort, at_most
from api.spec_model import SpecModel as _Model


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class PortForward(_Model):
    """A host port forwarded to a guest port (by SLIRP or passt); hostPort is allocated when omitted."""

    protocol: Protocol = Protocol.TCP
    guest_port: Port
    host_port: UnprivilegedPort | None = None


class NetworkMode(StrEnum):
    """How the guest's network card reaches the host (docs/networking.md)."""

    USER = "user"  # QEMU's SLIRP, restricted: forwards only, no egress
    PASST = "passt"  # a passt process per VM: forwards, egress, IPv6


class NetworkSpec(_Model):
    forwards: Annotated[tuple[PortForward, ...], at_most(FORWARDS_MAX, "forwards")] = Field(
        default=(), max_length=FORWARDS_MAX
    )
    # Both left out of the canonical form at their defaults, so specs stored before they existed
    # keep their hash (a changed hash is a new generation, and a restart).
    mode: NetworkMode = Field(
        default=NetworkMode.USER,
        description="user (QEMU's SLIRP, no egress) or passt (docs/networking.md)",
        exclude_if=lambda mode: mode is NetworkMode.USER,
    )
    egress: bool | None = Field(
        default=None,
        description="Whether the guest may open connections out; default: the host's guest_egress "
        "setting in mode passt, false in mode user",
        exclude_if=lambda egress: egress is None,
    )

    @model_validator(mode="after")
    def _egress_fits_the_mode(self) -> NetworkSpec:
        problem = mode_egress_problem(self.mode, self.egress)
        if problem:
            raise ValueError(problem)
        return self

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


def mode_egress_problem(mode: NetworkMode, egress: bool | None) -> str:
    """Why `egress` cannot be had in `mode` ("" when it can): SLIRP maps 10.0.2.2 to the host's
    127.0.0.1 with no way to turn that off, and passt 2023.03 has no way to deny egress."""
    if mode is NetworkMode.USER and egress:
        return (
            "egress needs mode passt: in mode user (SLIRP) the guest would reach "
            "the host's own 127.0.0.1 at 10.0.2.2"
        )
    if mode is NetworkMode.PASST and egress is False:
        return "mode passt always gives the guest egress: use mode user for a guest without it"
    return ""
