"""Liveness decisions (controller/liveness.py) and the pass over them (liveness_watch.py), on
scripted /proc looks: which QEMUs are asked over QMP, and which cost nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from controller.liveness import (
    JITTER,
    POLL_WAITS,
    RELOOK_SECONDS,
    RELOOKS,
    Look,
    Sample,
    Target,
    judge,
    next_delay,
    sleeping_in_poll,
)
from controller.liveness_watch import liveness_pass, read_voluntary_switches, read_wchan, watch_liveness

POLL = "poll_schedule_timeout.constprop.0"
UP = Target("vm", 4242, monitor_connected=True, qmp_socket="/run/vm/qmp.sock")
DOWN = Target("vm", 4242, monitor_connected=False, qmp_socket="/run/vm/qmp.sock")


def test_the_documented_numbers() -> None:
    """docs/controller.md, "Liveness and resync": 3 re-looks 100 ms apart, passes up to 20 % early."""
    assert (RELOOKS, RELOOK_SECONDS, JITTER) == (3, 0.1, 0.2)


@pytest.mark.parametrize(
    ("target", "sample", "look"),
    [
        (UP, Sample(POLL), Look.HEALTHY),  # an idle main loop, the common case
        (UP, Sample("do_sys_poll"), Look.HEALTHY),
        (UP, Sample("ep_poll"), Look.HEALTHY),
        (UP, Sample("do_signal_stop"), Look.ODD),  # SIGSTOP
        (UP, Sample("futex_do_wait"), Look.ODD),  # blocked on a lock
        (UP, Sample("0"), Look.ODD),  # running (or a kernel that hides wait channels)
        (UP, Sample(""), Look.ODD),
        (UP, Sample(None), Look.GONE),  # exited: the pidfd reports it
        (UP, Sample(None, socket_present=False), Look.GONE),
        (UP, Sample(POLL, socket_present=False), Look.NO_SOCKET),
        (DOWN, Sample(POLL), Look.NO_MONITOR),  # no events come without a connection
        (DOWN, Sample(POLL, socket_present=False), Look.NO_SOCKET),
    ],
)
def test_judge(target: Target, sample: Sample, look: Look) -> None:
    assert judge(target, sample) is look


def switches(count: int | None, wchan: str = "0") -> Sample:
    return Sample(wchan, voluntary_switches=count)


@pytest.mark.parametrize(
    ("since", "now", "look"),
    [
        (switches(5), switches(6), Look.HEALTHY),  # it slept in between: not hung
        (switches(5), switches(5), Look.ODD),  # spinning or waiting for a CPU all along
        (switches(5, "futex_do_wait"), switches(5, "futex_do_wait"), Look.ODD),  # blocked all along
        (switches(5, "do_signal_stop"), switches(5, "do_signal_stop"), Look.ODD),  # stopped
        (switches(5), switches(6, "do_signal_stop"), Look.ODD),  # stopping is a switch, not health
        (switches(5), switches(6, "futex_do_wait"), Look.ODD),  # just blocked: maybe for good
        (switches(5), switches(5, POLL), Look.HEALTHY),
        (switches(None), switches(6), Look.ODD),  # unreadable counts prove nothing
        (switches(5), switches(None), Look.ODD),
        (None, switches(6), Look.ODD),  # the first closer look has nothing to compare with
    ],
)
def test_judge_a_closer_look(since: Sample | None, now: Sample, look: Look) -> None:
    assert judge(UP, now, since) is look


@pytest.mark.parametrize("wchan", [*POLL_WAITS, POLL, "do_select.isra.0"])
def test_poll_waits_with_or_without_a_compiler_suffix(wchan: str) -> None:
    assert sleeping_in_poll(wchan)


@pytest.mark.parametrize("wchan", ["0", "do_signal_stop", "futex_wait_queue", "pipe_read", "poll"])
def test_other_waits_are_not_poll(wchan: str) -> None:
    assert not sleeping_in_poll(wchan)


@pytest.mark.parametrize(
    ("draw", "delay"), [(0.0, 10.0), (0.5, 9.0), (0.999, 8.002), (-1.0, 10.0), (2.0, 8.0)]
)
def test_passes_come_at_most_a_period_apart_and_up_to_a_fifth_early(draw: float, delay: float) -> None:
    assert next_delay(10.0, draw) == pytest.approx(delay)


class World:
    """Watched QEMUs whose looks are scripted: each look takes the next sample of its uid."""

    def __init__(self, script: dict[str, list[Sample]], *, connected: bool = True) -> None:
        self.script = {uid: iter(samples) for uid, samples in script.items()}
        self.last: dict[str, Sample] = {}
        self.connected = connected
        self.looks: list[str] = []
        self.distrusted: list[str] = []
        self.woken: list[str] = []
        self.sleeps: list[float] = []

    def liveness_targets(self) -> list[Target]:
        return [
            Target(uid, 100 + index, self.connected, f"/run/{uid}") for index, uid in enumerate(self.script)
        ]

    def distrust(self, uid: str) -> None:
        self.distrusted.append(uid)

    def look(self, target: Target) -> Sample:
        self.looks.append(target.uid)
        self.last[target.uid] = next(self.script[target.uid], self.last.get(target.uid, Sample(POLL)))
        return self.last[target.uid]

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def run_pass(self) -> list[str]:
        return await liveness_pass(
            self, wake=self.woken.append, look=self.look, look_closer=self.look, sleep=self.sleep
        )


def odd(times: int) -> list[Sample]:
    return [Sample("futex_do_wait")] * times


# Every look of an odd QEMU: the first, the first closer one, then up to RELOOKS after a sleep.
ALL_LOOKS = RELOOKS + 2


@pytest.mark.parametrize(
    ("samples", "asked", "looks"),
    [
        ([Sample(POLL)], False, 1),  # healthy: one read, nothing asked
        ([Sample("0"), Sample(POLL)], False, 2),  # busy at the first look only
        ([*odd(ALL_LOOKS - 1), Sample(POLL)], False, ALL_LOOKS),  # back in poll at the last re-look
        (odd(ALL_LOOKS), True, ALL_LOOKS),  # still odd: asked
        ([Sample("do_signal_stop")] * 9, True, ALL_LOOKS),  # SIGSTOPped
        ([Sample("0"), switches(5), switches(5), switches(6)], False, 4),  # slept between re-looks
        ([Sample("0"), *[switches(5)] * 9], True, ALL_LOOKS),  # spinning: no voluntary switch
        ([Sample(None)], False, 1),  # gone: the pidfd tells
        ([Sample("0"), Sample(None)], False, 2),  # gone while looked at
        ([Sample(POLL, socket_present=False)], True, 1),  # socket removed: no re-look needed
    ],
)
async def test_one_vm_per_look(samples: list[Sample], asked: bool, looks: int) -> None:
    world = World({"vm": samples})
    assert await world.run_pass() == (["vm"] if asked else [])
    assert world.woken == world.distrusted == (["vm"] if asked else [])
    assert len(world.looks) == looks
    assert world.sleeps == [RELOOK_SECONDS] * max(0, looks - 2)


async def test_a_vm_without_a_qmp_connection_is_asked_every_pass() -> None:
    world = World({"vm": [Sample(POLL)]}, connected=False)
    assert await world.run_pass() == ["vm"]
    assert await world.run_pass() == ["vm"]


async def test_a_fleet_is_looked_at_in_one_pass_and_only_the_hung_one_is_asked() -> None:
    script = {f"vm-{index}": [Sample(POLL)] for index in range(100)}
    script["vm-7"] = [Sample("do_signal_stop")] * 9
    script["vm-8"] = [Sample("0"), Sample(POLL)]
    world = World(script)
    assert await world.run_pass() == ["vm-7"]
    # 100 first looks, a closer one at the two odd ones, then re-looks at the stopped one.
    assert len(world.looks) == 100 + 2 + RELOOKS
    assert world.sleeps == [RELOOK_SECONDS] * RELOOKS


class Stop(Exception):
    pass


async def test_the_watch_sleeps_a_jittered_period_then_passes() -> None:
    stopped = [Sample("do_signal_stop")] * 9
    world = World({"quiet": [Sample(POLL)] * 9, "hung": [Sample(POLL), *stopped]})
    counts: list[int] = []
    draws: Iterator[float] = iter([0.0, 0.5, 0.25])
    periods: list[float] = []

    async def sleep(seconds: float) -> None:
        if seconds != RELOOK_SECONDS:
            periods.append(seconds)
        if len(periods) > 2:
            raise Stop

    with pytest.raises(Stop):
        await watch_liveness(
            world,
            period=10.0,
            wake=world.woken.append,
            asked=counts.append,
            look=world.look,
            look_closer=world.look,
            sleep=sleep,
            draw=lambda: next(draws),
        )
    assert periods == [10.0, 9.0, 9.5]
    assert counts == [0, 1]  # the second pass found "hung" stopped
    assert world.woken == world.distrusted == ["hung"]


def test_reading_a_wait_channel_and_the_switch_count() -> None:
    """A live process's wait channel is a string and its sleeps are counted; a pid that does not
    exist reads as gone."""
    assert isinstance(read_wchan(os.getpid()), str)
    assert read_wchan(2**22 + 1) is None  # above pid_max's largest value
    before = read_voluntary_switches(os.getpid())
    time.sleep(0.01)  # a sleep is a voluntary switch
    after = read_voluntary_switches(os.getpid())
    assert before is not None
    assert after is not None
    assert after > before
    assert read_voluntary_switches(2**22 + 1) is None
