"""The guest-agent rung of the stop ladder (controller/stop_ladder.py): guest-shutdown first
when the agent answered its last ask, the power button after AGENT_SHUTDOWN_WINDOW (at most half
of stopTimeout), then quit and SIGKILL as for any VM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.actions import Action, Kill, Quit, RequestGuestShutdown, RequestPowerdown
from controller.model import Memory, ProcessObservation, QmpState
from controller.plan_types import Intent
from controller.stop_ladder import AGENT_SHUTDOWN_WINDOW, stop_process

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_window_is_ten_seconds() -> None:
    assert timedelta(seconds=10) == AGENT_SHUTDOWN_WINDOW


# (agent channel in the spec, agent connected, QMP state, stopTimeout, seconds since the stop
# was requested or None for the first pass) -> (actions, requeue seconds)
ROWS = {
    "connected: guest-shutdown first, 10 s for it": (
        (True, True, QmpState.RUNNING, 300, None),
        ([RequestGuestShutdown], 10),
    ),
    "connected, short stopTimeout: half of it": (
        (True, True, QmpState.RUNNING, 8, None),
        ([RequestGuestShutdown], 4),
    ),
    "waiting for guest-shutdown": ((True, True, QmpState.RUNNING, 300, 4), ([], 6)),
    "guest-shutdown did nothing: the power button": (
        (True, True, QmpState.RUNNING, 300, 10),
        ([RequestPowerdown], 290),
    ),
    "it is shutting down: no button": ((True, True, QmpState.SHUTDOWN, 300, 12), ([], 288)),
    "then quit after stopTimeout": ((True, True, QmpState.RUNNING, 300, 300), ([Quit], 5)),
    "then SIGKILL": ((True, True, QmpState.RUNNING, 300, 305), ([Kill], 1)),
    "channel but no agent: the power button at once": (
        (True, False, QmpState.RUNNING, 300, None),
        ([RequestPowerdown], 300),
    ),
    "no channel: the ladder as before": (
        (False, True, QmpState.RUNNING, 300, None),
        ([RequestPowerdown], 300),
    ),
    "no channel: no second press": ((False, False, QmpState.RUNNING, 300, 10), ([], 290)),
    "paused: quit at once, agent or not": ((True, True, QmpState.PAUSED, 300, None), ([Quit], 5)),
}


@pytest.mark.parametrize(("situation", "expected"), ROWS.values(), ids=ROWS.keys())
def test_stop_ladder_with_a_guest_agent(
    situation: tuple[bool, bool, QmpState, int, float | None], expected: tuple[list[type[Action]], float]
) -> None:
    channel, connected, qmp, stop_timeout, elapsed = situation
    process = ProcessObservation(
        pid=42, argv_digest="d", started_at=NOW - timedelta(seconds=600), qmp=qmp, agent_connected=connected
    )
    memory = Memory() if elapsed is None else Memory(stop_requested_at=NOW - timedelta(seconds=elapsed))
    result = stop_process(
        process, memory, timedelta(seconds=stop_timeout), NOW, Intent.STOPPING, "asked", agent=channel
    )
    assert ([type(a) for a in result.actions], result.requeue_after) == (
        expected[0],
        timedelta(seconds=expected[1]),
    )
