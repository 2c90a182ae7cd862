"""The guest agent through the Reconciler on the fakes: status.guest follows the agents' last
report of the running QEMU, and a stop sends guest-shutdown first, the power button when the
agent is gone (docs/guest-agent.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.guest_types import GuestInterface, GuestStatus
from api.types import ExitReason, Phase
from controller.qemu.guest_agent import AgentUnavailable
from tests.unit.reconciler_world import World, spec

REPORT = GuestStatus(
    agent_connected=True,
    hostname="web",
    interfaces=(GuestInterface(name="eth0", addresses=("10.0.2.15/24",)),),
)


class FakeAgents:
    """Reports per uid; `shutdown` powers the fake guest off, as qemu-ga's guest-shutdown does."""

    def __init__(self) -> None:
        self.world: World | None = None
        self.reports: dict[str, GuestStatus] = {}
        self.shutdowns: list[Path] = []
        self.answers = True

    def observed(self, uid: str, pid: int) -> GuestStatus | None:
        return self.reports.get(uid)

    async def shutdown(self, directory: Path) -> None:
        if not self.answers:
            raise AgentUnavailable("the agent went away")
        self.shutdowns.append(directory)
        assert self.world is not None
        self.world.hv.exit(directory.name, code=0, guest_shutdown=True)


@pytest.fixture
def agents() -> FakeAgents:
    return FakeAgents()


@pytest.fixture
def world(tmp_path: Path, agents: FakeAgents) -> World:
    made = World(tmp_path, agents=agents)
    agents.world = made
    return made


async def test_status_shows_the_report_only_with_the_channel(world: World, agents: FakeAgents) -> None:
    with_agent, without = world.add("web", spec(guestAgent=True)), world.add("plain", spec())
    agents.reports = {with_agent: REPORT, without: REPORT}
    await world.settle(with_agent)
    await world.settle(without)
    assert world.status(with_agent).guest == REPORT
    assert world.status(without).guest is None


async def test_a_stop_goes_through_guest_shutdown(world: World, agents: FakeAgents) -> None:
    uid = world.add("web", spec(guestAgent=True))
    agents.reports[uid] = REPORT
    await world.settle(uid)
    world.change(uid, spec(guestAgent=True, runStrategy="Halted"))
    await world.settle(uid)
    status = world.status(uid)
    assert status.phase is Phase.STOPPED
    assert status.last_exit is not None
    assert status.last_exit.reason is ExitReason.STOPPED_BY_CONTROLLER
    assert [path.name for path in agents.shutdowns] == [uid]
    assert (uid, "system_powerdown") not in world.hv.commands
    assert status.guest is None  # no process, no report


async def test_an_agent_gone_at_the_stop_gets_the_power_button_at_once(
    world: World, agents: FakeAgents
) -> None:
    uid = world.add("web", spec(guestAgent=True))
    agents.reports[uid] = REPORT
    await world.settle(uid)
    agents.answers = False
    world.change(uid, spec(guestAgent=True, runStrategy="Halted"))
    await world.settle(uid)
    assert world.status(uid).phase is Phase.STOPPED
    assert agents.shutdowns == []
    assert (uid, "system_powerdown") in world.hv.commands
