"""controller/qemu/guest_agent.py against a fake qemu-ga on a UNIX socket that speaks the real
protocol: JSON lines, a 0xFF before the reply to guest-sync-delimited, no reply to
guest-shutdown, and replies shaped like qemu-ga 7.2's (recorded from the tiny guest)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from api.guest_types import (
    GUEST_ADDRESSES_MAX,
    GUEST_INTERFACES_MAX,
    GUEST_TEXT_MAX,
    GuestInterface,
    GuestStatus,
)
from controller import guest_agents
from controller.guest_agents import NOT_CONNECTED, GuestAgents
from controller.qemu import guest_agent
from controller.qemu.agent_channel import AGENT_SOCKET_NAME
from controller.qemu.guest_agent import AgentRefused, AgentUnavailable, GuestAgent

OS_INFO = {
    "name": "tofu-qemu tiny guest",
    "kernel-release": "6.1.0-50-cloud-amd64",
    "pretty-name": "tofu-qemu tiny guest",
    "version-id": "1",
    "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1",
    "machine": "x86_64",
    "id": "tofu-tiny-guest",
}


def interface(name: str, mac: str, *addresses: tuple[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "hardware-address": mac,
        "ip-addresses": [
            {"ip-address-type": "ipv6" if ":" in a else "ipv4", "ip-address": a, "prefix": p}
            for a, p in addresses
        ],
        "statistics": {"rx-bytes": 0},
    }


INTERFACES = [
    interface("lo", "00:00:00:00:00:00", ("127.0.0.1", 8), ("::1", 128)),
    interface("eth0", "52:54:00:12:34:56", ("10.0.2.15", 24), ("fe80::5054:ff:fe12:3456", 64)),
]


class FakeAgent:
    """qemu-ga's side of the channel. `replies` maps a command to its `return` (or a callable
    giving the whole reply line); `stale` is written before the 0xFF of the first sync, as a
    reply an earlier client never read."""

    def __init__(self) -> None:
        self.frozen = False
        self.received: list[str] = []
        self.stale = b'{"return": 7}\n'
        self.replies: dict[str, Any] = {
            "guest-get-osinfo": OS_INFO,
            "guest-get-host-name": {"host-name": "vm-a"},
            "guest-network-get-interfaces": INTERFACES,
        }
        self.silent = False

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line.lstrip(b"\xff"))
            command = request["execute"]
            self.received.append(command)
            if self.silent or command == "guest-shutdown":
                continue
            writer.write(self.reply(command, request.get("arguments", {})))
            await writer.drain()
        writer.close()

    def reply(self, command: str, arguments: dict[str, Any]) -> bytes:
        if command == "guest-sync-delimited":
            return self.stale + b"\xff" + json.dumps({"return": arguments["id"]}).encode() + b"\n"
        if command == "guest-fsfreeze-freeze":
            if self.frozen:
                error = {"class": "GenericError", "desc": "Command guest-fsfreeze-freeze has been disabled"}
                return json.dumps({"error": error}).encode() + b"\n"
            self.frozen = True
            return b'{"return": 1}\n'
        if command == "guest-fsfreeze-thaw":
            thawed, self.frozen = int(self.frozen), False
            return json.dumps({"return": thawed}).encode() + b"\n"
        if command == "guest-fsfreeze-status":
            return json.dumps({"return": "frozen" if self.frozen else "thawed"}).encode() + b"\n"
        reply = self.replies[command]
        return reply() if callable(reply) else json.dumps({"return": reply}).encode() + b"\n"


@pytest.fixture
async def agent_dir(tmp_path: Path) -> AsyncIterator[tuple[Path, FakeAgent]]:
    fake = FakeAgent()
    server = await asyncio.start_unix_server(fake.serve, path=str(tmp_path / AGENT_SOCKET_NAME))
    async with server:
        yield tmp_path, fake


async def test_status_reports_os_host_name_and_interfaces(agent_dir: tuple[Path, FakeAgent]) -> None:
    directory, fake = agent_dir
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        status = await agent.status()
    assert fake.received == [
        "guest-sync-delimited",
        "guest-get-osinfo",
        "guest-get-host-name",
        "guest-network-get-interfaces",
    ]
    assert status.agent_connected
    assert status.hostname == "vm-a"
    assert status.os_info is not None
    assert status.os_info.id == "tofu-tiny-guest"
    assert status.os_info.kernel_release == "6.1.0-50-cloud-amd64"
    assert status.interfaces[1] == GuestInterface(
        name="eth0", mac="52:54:00:12:34:56", addresses=("10.0.2.15/24", "fe80::5054:ff:fe12:3456/64")
    )


async def test_freeze_thaw_round_trip(agent_dir: tuple[Path, FakeAgent]) -> None:
    directory, _fake = agent_dir
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        assert await agent.freeze(2.0) == 1
        assert await agent.freeze_status() == "frozen"
        with pytest.raises(AgentRefused, match="disabled"):
            await agent.freeze(2.0)
        assert await agent.thaw(2.0) == 1
        assert await agent.freeze_status() == "thawed"


async def test_shutdown_expects_no_reply(agent_dir: tuple[Path, FakeAgent]) -> None:
    directory, fake = agent_dir
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        await asyncio.wait_for(agent.shutdown(), 1.0)
        await asyncio.wait_for(agent.freeze_status(), 1.0)  # the next reply is not taken for one
    assert fake.received[1] == "guest-shutdown"


async def test_a_silent_agent_is_unavailable_within_the_sync_timeout(
    agent_dir: tuple[Path, FakeAgent],
) -> None:
    directory, fake = agent_dir
    fake.silent = True
    started = asyncio.get_running_loop().time()
    with pytest.raises(AgentUnavailable, match="sync"):
        await GuestAgent.in_runtime_dir(directory, sync_seconds=0.2)
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_no_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable):
        await GuestAgent.in_runtime_dir(tmp_path)


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        pytest.param(
            "guest-get-host-name", lambda: b"x" * (guest_agent.REPLY_BYTES_MAX + 10) + b"\n", id="too-long"
        ),
        pytest.param("guest-get-host-name", lambda: b"not json\n", id="not-json"),
        pytest.param("guest-get-host-name", lambda: b'{"return": {"host-name": 5}}\n', id="wrong-type"),
        pytest.param(
            "guest-get-host-name",
            lambda: b'{"return": {"host-name": "' + b"h" * 300 + b'"}}\n',
            id="long-name",
        ),
        pytest.param("guest-network-get-interfaces", lambda: b'{"return": {"eth0": 1}}\n', id="not-a-list"),
    ],
)
async def test_untrusted_replies_are_refused(
    agent_dir: tuple[Path, FakeAgent], command: str, reply: Callable[[], bytes]
) -> None:
    directory, fake = agent_dir
    fake.replies[command] = reply
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        with pytest.raises(AgentUnavailable):
            await agent.status()


async def test_many_interfaces_and_addresses_are_cut_to_the_status_bounds(
    agent_dir: tuple[Path, FakeAgent],
) -> None:
    directory, fake = agent_dir
    many = [(f"10.0.{i}.1", 24) for i in range(20)]
    fake.replies["guest-network-get-interfaces"] = [
        interface(f"eth{i}", "52:54:00:00:00:01", *many) for i in range(20)
    ]
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        status = await agent.status()
    assert len(status.interfaces) == GUEST_INTERFACES_MAX == 16
    assert len(status.interfaces[0].addresses) == GUEST_ADDRESSES_MAX == 16


async def test_the_poll_wakes_only_vms_whose_report_changed(
    agent_dir: tuple[Path, FakeAgent], tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory, fake = agent_dir
    without_channel = tmp_path_factory.mktemp("plain")
    woken: list[str] = []
    targets = [("a", 10, directory), ("b", 11, without_channel)]
    agents = GuestAgents(targets=lambda: targets, wake=woken.append)
    assert await agents.poll() == ["a"]
    assert await agents.poll() == []
    observed = agents.observed("a", 10)
    assert observed is not None
    assert observed.hostname == "vm-a"
    assert agents.observed("a", 12) is None  # another QEMU of the VM: not asked yet
    assert agents.observed("b", 11) is None  # no channel: never asked
    fake.replies["guest-get-host-name"] = {"host-name": "renamed"}
    assert await agents.poll() == ["a"]
    fake.silent = True
    assert await agents.poll() == ["a"]
    assert agents.observed("a", 10) == NOT_CONNECTED
    assert woken == ["a", "a", "a"]
    targets[0] = ("a", 12, directory)  # a new QEMU of the VM: asked, and woken though the answer is the same
    assert await agents.poll() == ["a"]


def test_the_documented_limits() -> None:
    """docs/guest-agent.md names these; a change must change the docs too."""
    assert guest_agent.REPLY_BYTES_MAX == 64 * 1024
    assert guest_agent.CALL_SECONDS == 2.0
    assert guest_agent.SYNC_SECONDS == 1.0
    assert guest_agent._STALE_LINES_MAX == 8
    assert guest_agents.POLL_CONCURRENCY == 8
    assert GUEST_TEXT_MAX == 256


@pytest.mark.parametrize(("length", "accepted"), [(256, True), (257, False)])
async def test_a_host_name_of_up_to_256_characters_is_shown(
    agent_dir: tuple[Path, FakeAgent], length: int, accepted: bool
) -> None:
    directory, fake = agent_dir
    fake.replies["guest-get-host-name"] = {"host-name": "h" * length}
    async with await GuestAgent.in_runtime_dir(directory) as agent:
        if accepted:
            assert (await agent.status()).hostname == "h" * length
        else:
            with pytest.raises(AgentUnavailable):
                await agent.status()


async def test_one_pass_asks_at_most_eight_agents_at_once(tmp_path: Path) -> None:
    (tmp_path / AGENT_SOCKET_NAME).touch()
    busy, most = 0, 0

    class SlowAgent:
        async def __aenter__(self) -> SlowAgent:
            return self

        async def __aexit__(self, *_exc: object) -> None:
            pass

        async def status(self) -> GuestStatus:
            nonlocal busy, most
            busy += 1
            most = max(most, busy)
            await asyncio.sleep(0.01)
            busy -= 1
            return GuestStatus(agent_connected=True)

    async def connect(_directory: Path) -> Any:
        return SlowAgent()

    targets = [(f"vm-{i}", i, tmp_path) for i in range(20)]
    agents = GuestAgents(targets=lambda: targets, wake=lambda _uid: None, connect=connect)
    assert len(await agents.poll()) == 20
    assert most == guest_agents.POLL_CONCURRENCY == 8
