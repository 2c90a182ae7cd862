"""What the guest agent reports, as `status.guest` shows it (docs/guest-agent.md).

Everything here comes from inside the guest, so every string and list is bounded: a guest that
reports more is cut to these sizes by the controller, never stored whole.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Bounds on what a guest may put into status.
GUEST_TEXT_MAX = 256
GUEST_INTERFACES_MAX = 16
GUEST_ADDRESSES_MAX = 16


def no_schema_default(schema: dict[str, Any]) -> None:
    """For `spec.guestAgent`: absent means off, as in the canonical form, so the CRD has no
    default to write into stored objects."""
    schema.pop("default", None)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class GuestOsInfo(_Model):
    """guest-get-osinfo: the guest's os-release and uname."""

    id: str = Field(default="", max_length=GUEST_TEXT_MAX)
    name: str = Field(default="", max_length=GUEST_TEXT_MAX)
    pretty_name: str = Field(default="", max_length=GUEST_TEXT_MAX)
    version_id: str = Field(default="", max_length=GUEST_TEXT_MAX)
    kernel_release: str = Field(default="", max_length=GUEST_TEXT_MAX)
    machine: str = Field(default="", max_length=GUEST_TEXT_MAX)


class GuestInterface(_Model):
    """One network interface as the guest sees it; addresses are ADDRESS/PREFIX."""

    name: str = Field(max_length=GUEST_TEXT_MAX)
    mac: str = Field(default="", max_length=GUEST_TEXT_MAX)
    addresses: tuple[str, ...] = Field(default=(), max_length=GUEST_ADDRESSES_MAX)


class GuestStatus(_Model):
    """`status.guest`: what qemu-ga last said, refreshed on the liveness period."""

    agent_connected: bool = False
    os_info: GuestOsInfo | None = None
    hostname: str = Field(default="", max_length=GUEST_TEXT_MAX)
    interfaces: tuple[GuestInterface, ...] = Field(default=(), max_length=GUEST_INTERFACES_MAX)
