"""sd_notify and the watchdog period (controller/watchdog.py): a real unix datagram socket."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from controller import watchdog


def test_notify_sends_one_datagram_to_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        assert watchdog.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert systemd.recv(100) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"tofu-qemu-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + name)
        assert watchdog.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert systemd.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}])
def test_without_a_socket_nothing_is_sent(env: dict[str, str]) -> None:
    assert not watchdog.notify("READY=1", env)


def test_a_socket_nobody_listens_on_is_not_an_error(tmp_path: Path) -> None:
    assert not watchdog.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})


@pytest.mark.parametrize(
    ("env", "period"),
    [
        ({"WATCHDOG_USEC": "8000000"}, 4.0),  # half of WatchdogSec=8s
        ({"WATCHDOG_USEC": "8000000", "WATCHDOG_PID": "42"}, 4.0),
        ({"WATCHDOG_USEC": "8000000", "WATCHDOG_PID": "43"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_ping_period_is_half_the_watchdog_period(env: dict[str, str], period: float | None) -> None:
    assert watchdog.PINGS_PER_PERIOD == 2
    assert watchdog.ping_period(env, pid=42) == period


async def test_pings_come_from_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        pinging = asyncio.create_task(watchdog.ping_forever(0.01))
        await asyncio.sleep(0.1)
        pinging.cancel()
        pings = []
        while True:
            try:
                pings.append(systemd.recv(100))
            except BlockingIOError:
                break
        assert len(pings) >= 2
        assert set(pings) == {b"WATCHDOG=1"}
