"""The QMP adapter: the only module that imports qemu.qmp (0.0.x, pinned in pyproject.toml).

Errors are typed by what the caller can do:
- `MonitorUnavailable`: no answer (not listening yet, gone, hung past the deadline). Transient:
  observe again; a process that stays unavailable is treated as hung.
- `MonitorCommandFailed`: QEMU answered with a QMP error. The command is wrong for the state.
CancelledError is never wrapped. Every call has a deadline: a round trip is ~0.4 ms, so seconds
mean "hung" (docs/guest.md#qemu-behaviours-the-code-relies-on).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from qemu.qmp import (
    ConnectError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from controller.loop_stalls import stall_tolerant_timeout

COMMAND_TIMEOUT_SECONDS = 2.0
CONNECT_RETRY_SECONDS = 0.005
# The controller reacts to these; the rest (e.g. RTC_CHANGE) are noise.
WATCHED_EVENTS = (
    "SHUTDOWN",
    "RESET",
    "STOP",
    "RESUME",
    "GUEST_PANICKED",
    "POWERDOWN",
    "NIC_RX_FILTER_CHANGED",
)

# qemu.qmp logs every disconnect at ERROR; a VM that exits is normal here and is logged once,
# as a structured event, by the controller.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class _QMPClient(QMPClient):
    """qemu.qmp's message hooks pretty-print every message (json, indent=2) for a debug line
    even when debug logging is off: 7 % of the controller's CPU in a 50-VM converge. These
    format a message only when the line is really logged.

    Events go to one queue of the watched ones, read by `Monitor.events`, instead of qemu.qmp's
    listeners: each listener keeps every event it hears in a history list for the connection's
    life, and the default one hears all of them (RTC_CHANGE included) and is never read, so a
    long-running VM's connection grew without bound."""

    def __init__(self) -> None:
        # No name: qemu.qmp would keep a logger per VM uid for the process's life, for log lines
        # that are silenced anyway.
        super().__init__()
        self.watched: asyncio.Queue[Message] = asyncio.Queue()

    async def _event_dispatch(self, msg: Message) -> None:
        if msg.get("event") in WATCHED_EVENTS:
            self.watched.put_nowait(msg)

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg


class MonitorUnavailable(Exception):
    """QMP did not answer in time, or the connection is gone."""


class MonitorCommandFailed(Exception):
    """QEMU refused a command (a QMP error reply)."""


class Monitor:
    """One QMP connection to one QEMU. A QMP socket serves one client at a time."""

    def __init__(self, client: _QMPClient) -> None:
        self._client = client

    @classmethod
    async def connect(
        cls, socket_path: Path, *, name: str, within: float, while_: Callable[[], bool] = lambda: True
    ) -> Monitor:
        """Connect and negotiate, retrying for `within` seconds.

        QEMU writes its pidfile before its QMP socket listens, and a first connect can fail
        negotiation (docs/guest.md#qemu-behaviours-the-code-relies-on), so early failures are
        retried, for as long as `while_()` holds (the caller's "the process is still alive").

        :raise MonitorUnavailable: not connected in time, or `while_()` turned false.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last_error: Exception | None = None
        while loop.time() < deadline and while_():
            if not socket_path.exists():
                # Not listening yet: a failed connect costs qemu.qmp a formatted traceback.
                await asyncio.sleep(CONNECT_RETRY_SECONDS)
                continue
            client = _QMPClient()
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await client.connect(str(socket_path))
                return cls(client)
            except (ConnectError, StateError, OSError, TimeoutError, QMPError) as err:
                last_error = err
                await _quietly_disconnect(client)
            await asyncio.sleep(CONNECT_RETRY_SECONDS)
        raise MonitorUnavailable(
            f"QMP of {name} at {socket_path} did not answer within {within:.1f} s: "
            f"{last_error or 'no socket'}"
        )

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        within: float = COMMAND_TIMEOUT_SECONDS,
    ) -> object:
        """Run one QMP command.

        :raise MonitorCommandFailed: QEMU replied with an error.
        :raise MonitorUnavailable: no reply within `within` seconds, or the connection is gone.
        """
        try:
            # A deadline served late by a frozen or starved controller is not QEMU's silence.
            async with stall_tolerant_timeout(within):
                return await self._client.execute(command, arguments)
        except ExecuteError as err:
            raise MonitorCommandFailed(f"{command}: {err}") from err
        except TimeoutError as err:
            raise MonitorUnavailable(f"{command}: no reply within {within:.1f} s") from err
        except (StateError, EOFError, OSError, QMPError) as err:
            raise MonitorUnavailable(f"{command}: {err or type(err).__name__}") from err

    async def nic_configured(self) -> bool:
        """Whether the guest has brought up a network card: QEMU resets every virtio-net to
        promiscuous mode, and a guest driver turns that off when its interface comes up. Asking
        also re-arms the NIC_RX_FILTER_CHANGED event, which QEMU sends once until asked.

        :raise MonitorUnavailable, MonitorCommandFailed: as `execute`.
        """
        reply = await self.execute("query-rx-filter")
        nics = reply if isinstance(reply, list) else []
        return any(isinstance(nic, dict) and nic.get("promiscuous") is False for nic in nics)

    async def query_status(self) -> str:
        """The guest run state: "running", "paused", "shutdown", "guest-panicked", ..."""
        reply = await self.execute("query-status")
        status = reply.get("status") if isinstance(reply, dict) else None
        if not isinstance(status, str):
            raise MonitorUnavailable(f"query-status: unexpected reply {reply!r}")
        return status

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Yield the WATCHED_EVENTS until the connection ends."""
        watched = self._client.watched
        while True:
            if not watched.empty():
                yield dict(watched.get_nowait())
                continue
            get = asyncio.ensure_future(watched.get())
            ended = asyncio.ensure_future(self._client.runstate_changed())
            try:
                done, _ = await asyncio.wait({get, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for future in (get, ended):
                    if not future.done():
                        future.cancel()
            if get in done:
                yield dict(get.result())
                continue
            if not self.is_connected:
                return

    @property
    def is_connected(self) -> bool:
        # An identity test: the liveness pass asks every VM's, every pass (Enum.name is a lookup).
        return self._client.runstate is Runstate.RUNNING

    async def close(self) -> None:
        """Disconnect. Closing after QEMU quit (EOF) is normal and not an error."""
        await _quietly_disconnect(self._client)


async def _quietly_disconnect(client: QMPClient) -> None:
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            await client.disconnect()
    except (EOFError, OSError, TimeoutError, QMPError):
        pass
