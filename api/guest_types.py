"""What the guest agent reports, as `status.guest` shows it (docs/guest-agent.md).

Everything here comes from inside the guest, so every string and list is bounded: a guest that
reports more is cut to these sizes by the controller, never stored whole.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Bounds on what a guest may put into status.
GUEST_TEXT_MAX = 256
GUEST_INTERFACES_MAX = 16
GUEST_ADDRESSES_MAX = 16
# C0 and C1 controls and DEL: a guest's host name must not carry terminal escapes into
# `tofu-qemu describe` or a log line.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROLS.sub("?", text)


GuestText = Annotated[str, AfterValidator(_printable), Field(max_length=GUEST_TEXT_MAX)]


def no_schema_default(schema: dict[str, Any]) -> None:
    """For `spec.guestAgent`: absent means off, as in the canonical form, so the CRD has no
    default to write into stored objects."""
    schema.pop("default", None)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


class GuestOsInfo(_Model):
    """guest-get-osinfo: the guest's os-release and uname."""

    id: GuestText = ""
    name: GuestText = ""
    pretty_name: GuestText = ""
    version_id: GuestText = ""
    kernel_release: GuestText = ""
    machine: GuestText = ""


class GuestInterface(_Model):
    """One network interface as the guest sees it; addresses are ADDRESS/PREFIX."""

    name: GuestText
    mac: GuestText = ""
    addresses: tuple[GuestText, ...] = Field(default=(), max_length=GUEST_ADDRESSES_MAX)


class GuestStatus(_Model):
    """`status.guest`: what qemu-ga last said, refreshed on the liveness period."""

    agent_connected: bool = False
    os_info: GuestOsInfo | None = None
    hostname: GuestText = ""
    interfaces: tuple[GuestInterface, ...] = Field(default=(), max_length=GUEST_INTERFACES_MAX)
