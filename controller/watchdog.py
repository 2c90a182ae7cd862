"""systemd's watchdog for a controller that hangs instead of dying (docs/multi-host.md).

A controller whose event loop hangs (a blocking call, a deadlock, a stopped process) renews no
lease and fences nothing: its own self-fence runs on that loop. Under systemd with
`WatchdogSec=`, the controller pings `WATCHDOG=1` from its event loop every half of the
watchdog period; a loop that stops for longer gets the unit's watchdog signal, then SIGKILL, and
`Restart=always` starts a new controller, which registers again and adopts or fences its QEMUs.

The protocol is sd_notify(3): one datagram to the unix socket `$NOTIFY_SOCKET` (a leading `@`
names an abstract socket). No socket, no watchdog: nothing is sent.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)
# Pings per watchdog period, as sd_watchdog_enabled(3) recommends (half the period).
PINGS_PER_PERIOD = 2


def notify(message: str, env: Mapping[str, str] = os.environ) -> bool:
    """Send `message` (e.g. `READY=1`) to systemd. Returns whether a socket was there to take it."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), target)
        except OSError as err:
            log.warning("sd_notify_failed", error=str(err))
            return False
    return True


def ping_period(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings, or None when systemd asked for none (no WATCHDOG_USEC,
    or it is meant for another process)."""
    usec = env.get("WATCHDOG_USEC", "")
    meant_for = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if meant_for and meant_for != str(pid if pid is not None else os.getpid()):
        return None
    return int(usec) / 1e6 / PINGS_PER_PERIOD


async def ping_forever(period: float) -> None:
    """`WATCHDOG=1` every `period` seconds, from the event loop: a hung loop stops the pings."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(period)


def start_pinging(tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
    """The pinging task in `tasks`, when systemd asked for pings (none otherwise)."""
    period = ping_period()
    return [] if period is None else [tasks.create_task(ping_forever(period), name="watchdog")]
