"""The fencing decisions as tables: when a controller self-fences, who is rescheduled, which
QEMUs are strays (controller/fencing.py; docs/multi-host.md, "Fencing")."""

from __future__ import annotations

import pytest

from api.hosts import Demand, PlacedVM, Resources
from controller.fencing import (
    FENCE_MARGIN_FRACTION,
    fence_deadline,
    fence_margin,
    must_fence,
    rescheduled,
    strays,
)
from controller.host_agent import RENEWALS_PER_LEASE


def test_the_documented_margin_is_a_fifth_of_the_lease() -> None:
    """docs/multi-host.md: with the default lease of 15 s, a controller that last renewed at t
    fences at t + 12 s, 3 s before its lease ends; renewals come every 5 s, so two fail first."""
    assert FENCE_MARGIN_FRACTION == 0.2
    assert fence_margin(15.0) == pytest.approx(3.0)
    assert fence_deadline(100.0, 15.0) == pytest.approx(112.0)
    assert RENEWALS_PER_LEASE == 3
    # Two renewals may fail before the fence: the third renewal would come after the deadline.
    assert 2 * 15.0 / RENEWALS_PER_LEASE < fence_deadline(0.0, 15.0) < 3 * 15.0 / RENEWALS_PER_LEASE


@pytest.mark.parametrize(
    ("now", "renewal_sent_at", "lease", "fence"),
    [
        (0.0, 0.0, 15.0, False),  # just renewed
        (11.9, 0.0, 15.0, False),
        (12.0, 0.0, 15.0, True),  # the deadline itself
        (14.9, 0.0, 15.0, True),  # the lease has not run out yet: fence before it does
        (500.0, 0.0, 15.0, True),  # woke from a long freeze
        (3.1, 0.0, 4.0, False),  # the e2e tests' lease of 4 s fences at 3.2 s
        (3.2, 0.0, 4.0, True),
        (1e9, float("-inf"), 15.0, True),  # never registered: never spawn
    ],
)
def test_must_fence(now: float, renewal_sent_at: float, lease: float, fence: bool) -> None:
    assert must_fence(now, renewal_sent_at, lease) is fence


def vm(uid: str, host: str | None, *, holds_data: bool = False) -> PlacedVM:
    return PlacedVM(uid, "p", uid, host, Demand(Resources(1, 256, 0), {}), holds_data=holds_data)


@pytest.mark.parametrize(
    ("vms", "lost", "moved"),
    [
        ([vm("a1", "a"), vm("b1", "b")], {"a": "gone"}, ["a1"]),
        ([vm("a1", "a", holds_data=True), vm("a2", "a")], {"a": "gone"}, ["a2"]),  # retained disk waits
        ([vm("a1", "a")], {}, []),  # nothing lost
        ([vm("u", None)], {"a": "gone"}, []),  # unplaced: the scheduler places it anyway
        ([vm("a1", "a"), vm("b1", "b")], {"a": "x", "b": "y"}, ["a1", "b1"]),
    ],
)
def test_rescheduled_moves_only_data_less_vms_of_lost_hosts(
    vms: list[PlacedVM], lost: dict[str, str], moved: list[str]
) -> None:
    assert [v.uid for v in rescheduled(vms, lost)] == moved


@pytest.mark.parametrize(
    ("running", "mine", "expected"),
    [
        (["a", "b"], ["a", "b"], []),
        (["b", "a", "c"], ["a"], ["b", "c"]),
        ([], ["a"], []),
        (["a"], [], ["a"]),
    ],
)
def test_strays_are_the_qemus_of_vms_placed_elsewhere(
    running: list[str], mine: list[str], expected: list[str]
) -> None:
    assert strays(running, mine) == expected
