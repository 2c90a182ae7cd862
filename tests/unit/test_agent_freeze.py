"""controller/agent_freeze.py: snapshots' freeze and thaw through a guest agent, against the
fake qemu-ga of test_guest_agent_client.py (the real protocol on a UNIX socket)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import agent_freeze
from controller.agent_freeze import FREEZE_SECONDS, THAW_SECONDS, AgentFreezer, ThawFailed
from controller.guest_agents import GuestAgents
from tests.unit.test_guest_agent_client import FakeAgent, agent_dir  # noqa: F401 (fixture)


async def freezer_on(directory: Path, *, pid: int | None = 10) -> AgentFreezer:
    agents = GuestAgents(targets=lambda: [("a", 10, directory)], wake=lambda _uid: None)
    await agents.poll()
    return AgentFreezer(agents, pid_of=lambda _uid: pid, run_dir=lambda _uid: directory)


async def test_a_connected_agent_freezes_and_thaws(agent_dir: tuple[Path, FakeAgent]) -> None:  # noqa: F811
    directory, fake = agent_dir
    freezer = await freezer_on(directory)
    assert freezer.connected("a")
    assert await freezer.freeze("a") is True
    assert fake.frozen
    await freezer.thaw("a")
    assert not fake.frozen


async def test_only_the_qemu_whose_agent_answered_counts_as_connected(
    agent_dir: tuple[Path, FakeAgent],  # noqa: F811
) -> None:
    directory, fake = agent_dir
    assert not (await freezer_on(directory, pid=None)).connected("a")  # no QEMU watched
    assert not (await freezer_on(directory, pid=12)).connected("a")  # another QEMU than asked
    fake.silent = True
    assert not (await freezer_on(directory)).connected("a")


async def test_a_refused_freeze_leaves_the_snapshot_crash_consistent_and_the_guest_thawed(
    agent_dir: tuple[Path, FakeAgent],  # noqa: F811
) -> None:
    directory, fake = agent_dir
    freezer = await freezer_on(directory)
    fake.frozen = True  # qemu-ga refuses a second freeze: the freeze fails
    assert await freezer.freeze("a") is False
    assert fake.received[-1] == "guest-fsfreeze-thaw"
    assert not fake.frozen


async def test_an_unconfirmed_thaw_fails_the_step(
    agent_dir: tuple[Path, FakeAgent],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory, fake = agent_dir
    freezer = await freezer_on(directory)
    assert await freezer.freeze("a")
    fake.silent = True
    monkeypatch.setattr(agent_freeze, "THAW_SECONDS", 0.2)
    with pytest.raises(ThawFailed):
        await freezer.thaw("a")


def test_the_documented_waits() -> None:
    assert (FREEZE_SECONDS, THAW_SECONDS) == (10.0, 5.0)
