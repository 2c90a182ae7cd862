"""Which watched QEMUs the guest-agent pass asks (guest_agents.of_runtime): those whose runtime
dir holds the agent socket, found by one look per QEMU process, not one per VM every pass."""

from __future__ import annotations

from pathlib import Path

from controller import guest_agents
from controller.liveness import Target
from controller.qemu.agent_channel import AGENT_SOCKET_NAME
from controller.qemu.argv import QMP_SOCKET_NAME


class FakeRuntime:
    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets

    def liveness_targets(self) -> list[Target]:
        return list(self.targets)

    def distrust(self, uid: str) -> None:
        raise AssertionError("the agent pass never distrusts")


def vm(root: Path, uid: str, pid: int, *, agent: bool) -> Target:
    directory = root / uid
    directory.mkdir(exist_ok=True)
    if agent:
        (directory / AGENT_SOCKET_NAME).touch()
    return Target(uid, pid, True, f"{directory}/{QMP_SOCKET_NAME}")


def test_only_qemus_with_an_agent_socket_are_targets_and_each_is_looked_at_once(tmp_path: Path) -> None:
    runtime = FakeRuntime([vm(tmp_path, "a", 10, agent=True), vm(tmp_path, "b", 11, agent=False)])
    targets = guest_agents.of_runtime(runtime, wake=lambda _uid: None)._targets
    assert targets() == [("a", 10, tmp_path / "a")]
    # The same processes: their sockets are not looked at again (QEMU makes them at start-up).
    (tmp_path / "a" / AGENT_SOCKET_NAME).unlink()
    (tmp_path / "b" / AGENT_SOCKET_NAME).touch()
    assert targets() == [("a", 10, tmp_path / "a")]
    # A new QEMU of a VM is looked at afresh; a VM no longer watched is forgotten.
    runtime.targets = [vm(tmp_path, "b", 12, agent=True)]
    assert targets() == [("b", 12, tmp_path / "b")]
    runtime.targets = [vm(tmp_path, "a", 10, agent=False)]
    assert targets() == []
