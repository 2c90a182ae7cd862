"""One connection to a VM's serial port, shared by every interactive console attached to it.

QEMU serves ttyS0 as a UNIX socket in the VM's runtime dir, DATA/run/<uid>/serial.sock
(controller/qemu/argv.py `serial_chardev`), and accepts one client at a time. This API process
is that client: the first attachment to a VM opens the connection, the last one to leave closes
it, and in between one pump reads what the guest writes and hands each chunk to every attached
session. Any number may read; one at a time may write (`writer`). A session that falls
QUEUE_CHUNKS chunks behind is detached rather than allowed to hold the guest back: QEMU stops
the guest's serial output while its client does not read.

The socket's path may be longer than a UNIX address allows (107 bytes), so it is reached as
/proc/self/fd/N/serial.sock through a descriptor of its directory, as the controller reaches QMP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)
SERIAL_SOCKET = "serial.sock"
READ_CHUNK_BYTES = 4096
# Output waiting for one session; beyond it the session is too slow and is detached.
QUEUE_CHUNKS = 256
CONNECT_TIMEOUT_SECONDS = 5.0
# Closing the connection waits this long for what is buffered to reach QEMU; a guest whose UART
# takes no input would hold it forever (and the WebSocket with it): the connection is then cut.
CLOSE_TIMEOUT_SECONDS = 2.0
# The guest reads its UART slowly (and not at all while paused): input that cannot be handed to
# QEMU within this long ends the writer's session instead of blocking it forever.
WRITE_TIMEOUT_SECONDS = 10.0

_ids = itertools.count(1)


class NoSerialSocket(Exception):
    """The VM's serial socket is not here: it is not running, or runs on another host."""


class TooManyConsoles(Exception):
    """As many console sessions as allowed are open (in all, or for this principal): 429."""


class ConsolesClosing(Exception):
    """The server is stopping: 503."""


@dataclass(eq=False)
class Attachment:
    """One session on a line: its output queue (None ends it) and whether it may write."""

    principal: str
    writer: bool
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_CHUNKS))
    id: int = field(default_factory=lambda: next(_ids))
    ended: str | None = None

    def end(self, reason: str) -> None:
        """Stop the session's output with `reason`; the first reason given wins."""
        if self.ended is not None:
            return
        self.ended = reason
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:  # a session too slow to read loses its backlog: it is leaving
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


def serial_socket_dir(data_dir: Path, uid: str) -> Path:
    """DATA/run/<uid>/. :raise ValueError: `uid` is not a UUID (never a path)."""
    return data_dir / "run" / str(uuid.UUID(uid))


class SerialLine:
    """The shared connection to one VM's serial socket."""

    def __init__(self, uid: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.uid = uid
        self._reader = reader
        self._writer = writer
        self.attachments: list[Attachment] = []
        self._pump: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, data_dir: Path, uid: str) -> SerialLine:
        """:raise NoSerialSocket: no socket there, or nobody listening on it."""
        directory = serial_socket_dir(data_dir, uid)
        try:
            dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise NoSerialSocket(str(directory)) from err
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_unix_connection(f"/proc/self/fd/{dir_fd}/{SERIAL_SOCKET}")
        except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as err:
            raise NoSerialSocket(f"{directory / SERIAL_SOCKET}: {err or type(err).__name__}") from err
        finally:
            os.close(dir_fd)
        return cls(uid, reader, writer)

    def attach(self, principal: str, *, want_write: bool) -> Attachment:
        """Attach a session; it writes only if it asked to and no other session writes."""
        writer = want_write and self.writer() is None
        attachment = Attachment(principal, writer)
        self.attachments.append(attachment)
        if self._pump is None:
            self._pump = asyncio.create_task(self._read_forever(), name=f"serial-pump-{self.uid}")
        return attachment

    @property
    def closed(self) -> bool:
        """The pump ended (QEMU closed the socket): a new session needs a new connection."""
        return self._pump is not None and self._pump.done()

    def writer(self) -> Attachment | None:
        return next((a for a in self.attachments if a.writer and a.ended is None), None)

    def detach(self, attachment: Attachment, reason: str) -> None:
        attachment.end(reason)
        with contextlib.suppress(ValueError):
            self.attachments.remove(attachment)

    async def send(self, attachment: Attachment, data: bytes) -> None:
        """Hand `data` to the guest. :raise PermissionError: `attachment` is not the writer.
        :raise ConnectionError: QEMU took none of it within WRITE_TIMEOUT_SECONDS, or is gone."""
        if attachment.ended is not None:
            return  # the session is leaving: its last keys go nowhere
        if not attachment.writer:
            raise PermissionError("this session is read-only")
        async with self._write_lock:
            self._writer.write(data)
            try:
                async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                    await self._writer.drain()
            except TimeoutError as err:
                raise ConnectionAbortedError(
                    f"the guest took no input for {WRITE_TIMEOUT_SECONDS:.0f} s (is it paused?)"
                ) from err

    async def close(self) -> None:
        """End every session and the connection (the last session left, or the server stops)."""
        for attachment in list(self.attachments):
            self.detach(attachment, "the console closed")
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()
        except OSError:
            pass

    async def _read_forever(self) -> None:
        reason = "the VM's serial port closed (the VM stopped or restarted)"
        try:
            while data := await self._reader.read(READ_CHUNK_BYTES):
                for attachment in list(self.attachments):
                    try:
                        attachment.queue.put_nowait(data)
                    except asyncio.QueueFull:
                        log.info("console_session_too_slow", uid=self.uid, principal=attachment.principal)
                        self.detach(attachment, "too slow: the session fell behind the guest's output")
        except OSError as err:
            reason = f"the VM's serial port failed: {err}"
        for attachment in list(self.attachments):
            self.detach(attachment, reason)


class ConsoleHub:
    """Every open line of this API process, and the bounds on sessions (in all, per principal)."""

    def __init__(self, data_dir: Path, *, total: int, per_principal: int) -> None:
        self._data_dir = data_dir
        self._total = total
        self._per_principal = per_principal
        self._lines: dict[str, SerialLine] = {}
        self._opening = asyncio.Lock()
        self._by_principal: Counter[str] = Counter()
        self.closing = False

    def open_count(self) -> int:
        return sum(self._by_principal.values())

    def _admit(self, principal: str) -> None:
        if self.closing:
            raise ConsolesClosing("the server is shutting down")
        if self.open_count() >= self._total:
            raise TooManyConsoles(f"{self._total} console sessions are open; try again later")
        if self._by_principal[principal] >= self._per_principal:
            raise TooManyConsoles(
                f"{principal!r} has {self._per_principal} console sessions open, the most one may; "
                "close one or try again later"
            )

    @contextlib.asynccontextmanager
    async def session(
        self, uid: str, principal: str, *, want_write: bool
    ) -> AsyncIterator[tuple[SerialLine, Attachment]]:
        """Attach to `uid`'s line (opening it first if this is its first session) for the body.

        :raise TooManyConsoles: every place is taken. :raise ConsolesClosing: the server stops.
        :raise NoSerialSocket: the VM's serial socket is not here.
        """
        self._admit(principal)
        self._by_principal[principal] += 1
        try:
            line = await self._line(uid)
            attachment = line.attach(principal, want_write=want_write)
            try:
                yield line, attachment
            finally:
                line.detach(attachment, attachment.ended or "detached")
                if not line.attachments:
                    if self._lines.get(uid) is line:
                        del self._lines[uid]
                    await line.close()
        finally:
            self._by_principal[principal] -= 1
            if not self._by_principal[principal]:
                del self._by_principal[principal]

    async def _line(self, uid: str) -> SerialLine:
        async with self._opening:  # two first sessions of one VM must share one connection
            line = self._lines.get(uid)
            if line is None or line.closed:
                line = self._lines[uid] = await SerialLine.open(self._data_dir, uid)
        return line

    async def close(self) -> None:
        """Refuse new sessions and end the open ones (server shutdown)."""
        self.closing = True
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            await line.close()
