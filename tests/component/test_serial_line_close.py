"""api/server/serial_line.py: closing a console connection to a guest that reads nothing ends
within CLOSE_TIMEOUT_SECONDS instead of holding the WebSocket (and its handler) forever."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

from api.server.serial_line import CLOSE_TIMEOUT_SECONDS, SERIAL_SOCKET, SerialLine, serial_socket_dir

UID = "6b0e8c8a-3c1e-4a8e-9f4e-2f2d7a9d1c11"


async def test_closing_a_line_whose_guest_reads_nothing_takes_at_most_the_close_timeout() -> None:
    assert CLOSE_TIMEOUT_SECONDS == 2.0
    with tempfile.TemporaryDirectory(prefix="tq") as short:  # a UNIX socket path has 107 bytes
        await _close_a_line_nobody_reads(Path(short))


async def _close_a_line_nobody_reads(tmp_path: Path) -> None:
    directory = serial_socket_dir(tmp_path, UID)
    directory.mkdir(parents=True)
    held: list[asyncio.StreamWriter] = []

    async def never_read(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never read: a UART that takes no input

    server = await asyncio.start_unix_server(never_read, path=str(directory / SERIAL_SOCKET))
    async with server:
        line = await SerialLine.open(tmp_path, UID)
        line.attach("alice", want_write=True)
        transport = line._writer.transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        line._writer.write(b"x" * (8 << 20))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await line.close()
        took = loop.time() - started
        assert took < CLOSE_TIMEOUT_SECONDS + 1.0, took
        assert took >= CLOSE_TIMEOUT_SECONDS - 0.1, "the buffered data was given its chance"
        assert transport.is_closing()
        for writer in held:
            writer.close()
