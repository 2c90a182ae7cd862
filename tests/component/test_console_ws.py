"""The interactive console WebSocket (api/server/console_ws.py) against the real app and store.

QEMU's side is a UNIX socket server at DATA/run/<uid>/serial.sock that behaves as QEMU's
`-chardev socket,server=on` does for these purposes: it takes clients one at a time and passes
bytes both ways. The real QEMU and tiny guest are in tests/e2e/test_console.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from socket import socketpair
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from api.client.commands import run_client
from api.server.console_ws import (
    HEARTBEAT_SECONDS,
    INPUT_FRAME_MAX_BYTES,
    SEND_TIMEOUT_SECONDS,
    console_hub_of,
)
from api.server.serial_line import (
    QUEUE_CHUNKS,
    READ_CHUNK_BYTES,
    WRITE_TIMEOUT_SECONDS,
    SerialLine,
    serial_socket_dir,
)
from api.settings import ServerSettings
from controller.cli import build_parser
from tests.component.conftest import AUTH
from tests.component.k8s_support import APIS, Client, Serve, api, serve
from tests.component.test_k8s_api import declare_lab, uid_of

__all__ = ["api", "serve"]  # fixtures
CONSOLE = f"{APIS}/projects/lab/qemuvms/web/console"
INTERACTIVE = {"interactive": "true"}
TOKEN = {"Authorization": "Bearer tok-1"}
WAIT = 5.0
# A WebSocket handshake by hand, to read the body of a refusal.
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


class FakeSerial:
    """QEMU's serial socket: one client at a time, every byte it sent kept in `received`."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.clients: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self._got = asyncio.Event()
        self._connected = asyncio.Event()

    async def start(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        try:  # the path may be longer than a UNIX address may be, as the API's is
            self.server = await asyncio.start_unix_server(self._serve, f"/proc/self/fd/{dir_fd}/serial.sock")
        finally:
            os.close(dir_fd)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.clients.append(writer)
        self._connected.set()
        while data := await reader.read(4096):
            self.received += data
            self._got.set()

    async def emit(self, data: bytes) -> None:
        async with asyncio.timeout(WAIT):
            await self._connected.wait()
        self.clients[-1].write(data)
        await self.clients[-1].drain()

    async def wait_for(self, data: bytes) -> None:
        async with asyncio.timeout(WAIT):
            while data not in self.received:
                self._got.clear()
                await self._got.wait()

    async def stop(self) -> None:
        """The VM stopped: QEMU's socket and its client connections close."""
        for client in self.clients:
            client.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def serial(api: Client, settings: ServerSettings) -> AsyncIterator[FakeSerial]:
    await declare_lab(api)
    fake = FakeSerial()
    await fake.start(serial_socket_dir(settings.data_dir, await uid_of(api)))
    yield fake
    await all_detached(api)
    await fake.stop()


async def attach(
    api: Client, headers: dict[str, str] = AUTH, **params: str
) -> aiohttp.ClientWebSocketResponse:
    return await api.ws_connect(CONSOLE, params={**INTERACTIVE, **params}, headers=headers)


async def notice(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await socket.receive(timeout=WAIT)
    assert message.type is WSMsgType.TEXT, message
    return dict(json.loads(message.data))


async def output_until(socket: aiohttp.ClientWebSocketResponse, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        message = await socket.receive(timeout=WAIT)
        if message.type is WSMsgType.BINARY:
            data += message.data
        else:
            assert message.type is WSMsgType.TEXT, message
    return data


async def events(api: Client) -> list[tuple[str, str]]:
    response = await api.get(f"{APIS}/projects/lab/qemuvms/web/events", headers=AUTH)
    return [(e["reason"], e["message"]) for e in (await response.json())["items"]]


async def all_detached(api: Client) -> None:
    """Every session's handler has finished (its detach event recorded)."""
    hub = console_hub_of(api.app)
    async with asyncio.timeout(WAIT):
        while hub.open_count():  # noqa: ASYNC110 - the count has no event to wait on
            await asyncio.sleep(0.02)


async def test_a_round_trip_through_the_serial_port(api: Client, serial: FakeSerial) -> None:
    socket = await attach(api)
    hello = await notice(socket)
    assert (hello["type"], hello["role"]) == ("attached", "writer")
    assert hello["message"] == "alice attached to the serial console as writer"
    await socket.send_bytes(b"echo hi\r")
    await socket.send_str("typed as text\r")
    await serial.wait_for(b"echo hi\rtyped as text\r")
    await serial.emit(b"hi\r\n/ # ")
    assert await output_until(socket, b"/ # ") == b"hi\r\n/ # "
    await socket.close()


async def test_one_writer_and_several_readers_on_one_connection(api: Client, serial: FakeSerial) -> None:
    """A second session that asks to write is attached read-only and told why; its keys are
    dropped; both read; once the writer leaves, the next session may write."""
    writer = await attach(api)
    assert (await notice(writer))["role"] == "writer"
    second = await attach(api, TOKEN)
    hello = await notice(second)
    assert hello["role"] == "reader"
    assert hello["message"].endswith("as reader: another session holds the input")
    await second.send_bytes(b"rm -rf /\r")
    assert (await notice(second))["type"] == "readOnly"
    await writer.send_bytes(b"ok\r")
    await serial.wait_for(b"ok\r")
    assert b"rm -rf" not in serial.received
    await serial.emit(b"both see this\n")
    assert await output_until(writer, b"this\n") == b"both see this\n"
    assert await output_until(second, b"this\n") == b"both see this\n"
    assert serial.connections == 1
    await writer.close()
    third = await attach(api)
    assert (await notice(third))["role"] == "writer"
    voluntary = await attach(api, TOKEN, readOnly="true")
    assert (await notice(voluntary))["message"] == "token:env-1 attached to the serial console as reader"
    for socket in (second, third, voluntary):
        await socket.close()


async def test_attach_and_detach_are_events_with_the_principal(api: Client, serial: FakeSerial) -> None:
    socket = await attach(api)
    await notice(socket)
    await socket.close()
    await all_detached(api)
    recorded = [event for event in await events(api) if event[0].startswith("Console")]
    assert recorded[0] == ("ConsoleAttached", "alice attached to the serial console as writer")
    assert recorded[1][0] == "ConsoleDetached"
    assert recorded[1][1].startswith("alice detached from the serial console after ")


async def test_without_credentials_401(api: Client, serial: FakeSerial) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await api.ws_connect(CONSOLE, params=INTERACTIVE)
    assert refused.value.status == 401


async def test_a_page_of_another_origin_is_refused(api: Client, serial: FakeSerial) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await attach(api, {**AUTH, "Origin": "https://evil.example"})
    assert refused.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as cross_site:
        await attach(api, {**AUTH, "Sec-Fetch-Site": "cross-site"})
    assert cross_site.value.status == 403
    own = await attach(api, {**AUTH, "Origin": f"http://{api.host}:{api.port}"})
    assert (await notice(own))["type"] == "attached"
    await own.close()


async def test_sessions_are_limited_per_principal_and_in_all(serve: Serve, settings: ServerSettings) -> None:
    api = await serve(max_consoles=2, max_consoles_per_principal=1)
    await declare_lab(api)
    fake = FakeSerial()
    await fake.start(serial_socket_dir(settings.data_dir, await uid_of(api)))
    first = await attach(api)
    await notice(first)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await attach(api)
    assert refused.value.status == 429
    assert refused.value.headers is not None
    assert refused.value.headers["Retry-After"] == "5"
    handshake = await api.get(CONSOLE, params=INTERACTIVE, headers={**AUTH, **UPGRADE})
    assert "'alice' has 1 console sessions open" in (await handshake.json())["message"]
    other = await attach(api, TOKEN)
    await notice(other)
    with pytest.raises(aiohttp.WSServerHandshakeError) as in_all:
        await attach(api, TOKEN)
    assert in_all.value.status == 429
    handshake = await api.get(CONSOLE, params=INTERACTIVE, headers={**TOKEN, **UPGRADE})
    assert "2 console sessions are open" in (await handshake.json())["message"]
    await first.close()
    await other.close()
    await all_detached(api)
    await fake.stop()


async def test_an_input_frame_over_the_limit_closes_the_session(api: Client, serial: FakeSerial) -> None:
    socket = await attach(api)
    await notice(socket)
    await socket.send_bytes(b"x" * INPUT_FRAME_MAX_BYTES)
    await serial.wait_for(b"x" * INPUT_FRAME_MAX_BYTES)
    await socket.send_bytes(b"y" * (INPUT_FRAME_MAX_BYTES + 1))
    message = await socket.receive(timeout=WAIT)
    while message.type is not WSMsgType.CLOSE:
        message = await socket.receive(timeout=WAIT)
    assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert b"y" not in serial.received


async def test_an_idle_writer_is_detached(serve: Serve, settings: ServerSettings) -> None:
    api = await serve(console_idle_seconds=1)  # model_copy skips the 10 s minimum
    await declare_lab(api)
    fake = FakeSerial()
    await fake.start(serial_socket_dir(settings.data_dir, await uid_of(api)))
    socket = await attach(api)
    await notice(socket)
    assert await notice(socket) == {"type": "detached", "reason": "idle: no input for 1 s"}
    message = await socket.receive(timeout=WAIT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 4001)
    await all_detached(api)
    await fake.stop()


async def test_the_vm_stopping_ends_the_sessions(api: Client, serial: FakeSerial) -> None:
    socket = await attach(api)
    await notice(socket)
    await serial.emit(b"last words\n")
    await serial.stop()
    assert await output_until(socket, b"words\n") == b"last words\n"
    assert (await notice(socket))["reason"] == "the VM's serial port closed (the VM stopped or restarted)"
    message = await socket.receive(timeout=WAIT)
    assert (message.type, message.data) == (WSMsgType.CLOSE, 4000)


async def test_a_vm_without_a_serial_socket_is_409(api: Client) -> None:
    """Not running here (or on a host whose runtime dir this API cannot reach): a clear 409."""
    await declare_lab(api)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await attach(api)
    assert refused.value.status == 409


async def test_a_plain_get_asking_for_interactive_is_400(api: Client, serial: FakeSerial) -> None:
    response = await api.get(CONSOLE, params=INTERACTIVE, headers=AUTH)
    assert response.status == 400
    assert "WebSocket" in (await response.json())["message"]


async def test_a_session_too_slow_for_the_guest_is_detached() -> None:
    """QEMU holds the guest's output while its client does not read: a session that falls
    QUEUE_CHUNKS chunks behind is let go instead, and the others keep reading."""
    ours, qemu = socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    line = SerialLine("0" * 32, reader, writer)
    slow = line.attach("slow", want_write=True)
    quick = line.attach("quick", want_write=True)
    assert (slow.writer, quick.writer) == (True, False)
    qemu.setblocking(False)
    loop = asyncio.get_running_loop()
    for index in range(QUEUE_CHUNKS + 1):
        await loop.sock_sendall(qemu, b"%06d" % index)
        async with asyncio.timeout(WAIT):  # one read a chunk: wait until the pump handed it on
            while quick.queue.empty():  # noqa: ASYNC110 - the pump sets no event
                await asyncio.sleep(0)
        while not quick.queue.empty():
            quick.queue.get_nowait()
        assert (slow.ended is None) == (index < QUEUE_CHUNKS)
    assert slow.ended == "too slow: the session fell behind the guest's output"
    assert quick.ended is None
    assert slow not in line.attachments
    await line.close()
    qemu.close()


def test_the_documented_defaults() -> None:
    """docs/console.md and the README: every number there."""
    defaults = ServerSettings()
    assert (defaults.max_consoles, defaults.max_consoles_per_principal) == (16, 4)
    assert defaults.console_idle_seconds == 900
    assert INPUT_FRAME_MAX_BYTES == 4096
    assert (QUEUE_CHUNKS, READ_CHUNK_BYTES) == (256, 4096)
    assert (WRITE_TIMEOUT_SECONDS, SEND_TIMEOUT_SECONDS, HEARTBEAT_SECONDS) == (10.0, 30.0, 30.0)


async def test_only_the_vm_page_allows_inline_styles(api: Client) -> None:
    """xterm.js styles itself with <style> elements: the VM page's CSP allows inline styles,
    never inline scripts, and the other pages keep `default-src 'self'` alone."""
    await declare_lab(api)
    vm_page = await api.get("/ui/projects/lab/vms/web", headers=AUTH)
    csp = vm_page.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'self';")
    assert csp.endswith("; style-src 'self' 'unsafe-inline'")
    assert "script-src" not in csp
    for page in ("/ui", "/ui/projects/lab"):
        other = await api.get(page, headers=AUTH)
        assert "unsafe-inline" not in other.headers["Content-Security-Policy"]
    terminal = await api.get("/ui/static/terminal.js", headers=AUTH)
    assert (terminal.status, terminal.content_type) == (200, "text/javascript")


async def test_the_cli_says_why_a_console_is_refused(api: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """`tofu-qemu console vm NAME` on a VM with no serial port here: exit 1, the reason on stderr,
    no "Connected" line (the terminal is never put in raw mode: stdin is no terminal here)."""
    await declare_lab(api)
    args = build_parser().parse_args(["console", "vm", "web", "-p", "lab"])
    env = {"TOFU_QEMU_SERVER": f"http://{api.host}:{api.port}", "TOFU_QEMU_TOKEN": "tok-1"}
    status = await asyncio.to_thread(run_client, args, env=env)
    err = capsys.readouterr().err
    assert status == 1
    assert "409 the VM is not running here" in err
    assert "Connected" not in err
