"""A client of qemu-ga, the guest agent, on the VM's virtio-serial channel (docs/guest-agent.md).

qemu-ga speaks QMP-shaped JSON lines but has no greeting and no capabilities negotiation, which
qemu.qmp's protocol layer insists on (and controller/qemu/monitor.py stays its only user), so
this is a small line client. A connection starts with `guest-sync-delimited`: the agent answers
with a 0xFF byte before its reply, so whatever an earlier client left half-read in the channel
is skipped up to that byte.

The agent runs inside the guest and is untrusted: a reply line is at most REPLY_BYTES_MAX, every
reply is validated with pydantic and cut to api/guest_types.py's bounds, and every call (the
connect too) has a timeout. Errors are typed by what the caller can do:
- `AgentUnavailable`: no agent, no answer in time, or nonsense: look again later;
- `AgentRefused`: the agent answered with an error (a command it does not allow, a freeze of
  a frozen guest): the request is wrong for the guest's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.guest_types import (
    GUEST_ADDRESSES_MAX,
    GUEST_INTERFACES_MAX,
    GUEST_TEXT_MAX,
    GuestInterface,
    GuestOsInfo,
    GuestStatus,
)
from controller.qemu.agent_channel import AGENT_SOCKET_NAME

# One reply line: the interface list of a guest with many addresses stays far below this.
REPLY_BYTES_MAX = 64 * 1024
CALL_SECONDS = 2.0
# A guest booting has no agent yet: the sync gets this long before "not connected".
SYNC_SECONDS = 1.0
# Lines read after the 0xFF before the sync's own reply: stale replies of an earlier client.
_STALE_LINES_MAX = 8
_DELIMITER = b"\xff"


class AgentUnavailable(Exception):
    """No agent answered in time (none runs yet, the channel is closed, or it said nonsense)."""


class AgentRefused(Exception):
    """The agent answered with an error."""


class _Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class _IpAddress(_Reply):
    address: str = Field(alias="ip-address", max_length=64)
    prefix: int = Field(ge=0, le=128)


class _Interface(_Reply):
    name: str = Field(max_length=GUEST_TEXT_MAX)
    mac: str = Field(default="", alias="hardware-address", max_length=64)
    addresses: list[_IpAddress] = Field(default=[], alias="ip-addresses", max_length=1024)


class _OsInfo(_Reply):
    id: str = Field(default="", max_length=GUEST_TEXT_MAX)
    name: str = Field(default="", max_length=GUEST_TEXT_MAX)
    pretty_name: str = Field(default="", alias="pretty-name", max_length=GUEST_TEXT_MAX)
    version_id: str = Field(default="", alias="version-id", max_length=GUEST_TEXT_MAX)
    kernel_release: str = Field(default="", alias="kernel-release", max_length=GUEST_TEXT_MAX)
    machine: str = Field(default="", max_length=GUEST_TEXT_MAX)


class _HostName(_Reply):
    host_name: str = Field(alias="host-name", max_length=GUEST_TEXT_MAX)


class GuestAgent:
    """One connection to one VM's qemu-ga. The channel serves one client at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, socket_path: Path, *, sync_seconds: float = SYNC_SECONDS) -> Self:
        """Connect to QEMU's end of the channel and sync with the agent.

        :raise AgentUnavailable: no socket, or no agent answered within `sync_seconds`.
        """
        try:
            async with asyncio.timeout(CALL_SECONDS):
                reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=REPLY_BYTES_MAX)
        except (OSError, TimeoutError) as err:
            raise AgentUnavailable(f"cannot connect to the guest agent channel: {err}") from err
        agent = cls(reader, writer)
        try:
            await agent._sync(sync_seconds)
        except BaseException:
            await agent.close()
            raise
        return agent

    @classmethod
    async def in_runtime_dir(cls, directory: Path, *, sync_seconds: float = SYNC_SECONDS) -> Self:
        """Connect through /proc/self/fd: a short socket path whatever the data dir's depth
        (sun_path holds 107 bytes), as the QMP connection does."""
        try:
            handle = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise AgentUnavailable(f"no runtime dir: {err}") from err
        try:
            return await cls.connect(
                Path(f"/proc/self/fd/{handle}/{AGENT_SOCKET_NAME}"), sync_seconds=sync_seconds
            )
        finally:
            os.close(handle)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _sync(self, seconds: float) -> None:
        token = secrets.randbelow(2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        try:
            async with asyncio.timeout(seconds):
                # A leading 0xFF makes the agent drop a half-written request of an earlier client.
                self._writer.write(_DELIMITER + json.dumps(request).encode() + b"\n")
                await self._writer.drain()
                await self._reader.readuntil(_DELIMITER)
                for _ in range(_STALE_LINES_MAX):
                    if _answer(await self._reader.readline()) == token:
                        return
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as err:
            # ValueError: a line longer than REPLY_BYTES_MAX, or one that is not JSON.
            raise AgentUnavailable(f"the guest agent did not answer the sync: {err!r}") from err
        except AgentRefused as err:
            raise AgentUnavailable(f"the guest agent refused the sync: {err}") from err
        raise AgentUnavailable("the guest agent answered the sync with something else")

    async def call(
        self, command: str, arguments: dict[str, Any] | None = None, *, seconds: float = CALL_SECONDS
    ) -> Any:
        """Run one command; its `return` value.

        :raise AgentUnavailable: no answer in time, or an answer that is not JSON.
        :raise AgentRefused: the agent answered with an error.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            async with asyncio.timeout(seconds):
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
                return _answer(await self._reader.readline())
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as err:
            raise AgentUnavailable(f"{command}: no answer from the guest agent: {err!r}") from err

    async def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Send a command that has no reply on success (guest-shutdown)."""
        request: dict[str, Any] = {"execute": command, **({"arguments": arguments} if arguments else {})}
        try:
            async with asyncio.timeout(CALL_SECONDS):
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
        except (OSError, TimeoutError) as err:
            raise AgentUnavailable(f"{command}: cannot write to the guest agent: {err!r}") from err

    async def status(self) -> GuestStatus:
        """What status.guest shows: os info, host name and interfaces, in three calls."""
        try:
            os_info = _OsInfo.model_validate(await self.call("guest-get-osinfo"))
            host = _HostName.model_validate(await self.call("guest-get-host-name"))
            interfaces = [
                _Interface.model_validate(i) for i in _listed(await self.call("guest-network-get-interfaces"))
            ]
        except ValidationError as err:
            raise AgentUnavailable(f"the guest agent's reply is not what qemu-ga sends: {err}") from err
        return GuestStatus(
            agent_connected=True,
            os_info=GuestOsInfo.model_validate(os_info.model_dump()),
            hostname=host.host_name,
            interfaces=tuple(_shown(interface) for interface in interfaces[:GUEST_INTERFACES_MAX]),
        )

    async def shutdown(self) -> None:
        """guest-shutdown (power off); the agent sends no reply when it works."""
        await self.send("guest-shutdown", {"mode": "powerdown"})

    async def freeze(self, seconds: float) -> int:
        """guest-fsfreeze-freeze: the number of filesystems frozen. Thaw soon after: a frozen
        guest blocks every write."""
        return _count(await self.call("guest-fsfreeze-freeze", seconds=seconds))

    async def thaw(self, seconds: float) -> int:
        """guest-fsfreeze-thaw: the number of filesystems thawed."""
        return _count(await self.call("guest-fsfreeze-thaw", seconds=seconds))

    async def freeze_status(self) -> str:
        """guest-fsfreeze-status: "thawed" or "frozen"."""
        state = await self.call("guest-fsfreeze-status")
        if state not in ("thawed", "frozen"):
            raise AgentUnavailable(f"guest-fsfreeze-status said {str(state)[:40]!r}")
        return str(state)


def _answer(line: bytes) -> Any:
    """The `return` of one reply line; AgentRefused for an `error`."""
    if not line.endswith(b"\n"):
        raise AgentUnavailable("the guest agent closed the channel")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a reply that is not an object")
    if "error" in message:
        error = message["error"]
        desc = error.get("desc", "") if isinstance(error, dict) else error
        raise AgentRefused(str(desc)[:GUEST_TEXT_MAX])
    if "return" not in message:
        raise ValueError("a reply without return or error")
    return message["return"]


def _listed(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise AgentUnavailable("guest-network-get-interfaces did not return a list")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AgentUnavailable(f"expected a count of filesystems, got {str(value)[:40]!r}")
    return value


def _shown(interface: _Interface) -> GuestInterface:
    addresses = tuple(f"{a.address}/{a.prefix}" for a in interface.addresses[:GUEST_ADDRESSES_MAX])
    return GuestInterface(name=interface.name, mac=interface.mac, addresses=addresses)
