"""Connection limits (issue 15 H1), in-process through the real listener (GuardedSite) and app:
header, keep-alive and body deadlines, the cap with its eviction of idle connections, and the
503 when every connection is in a request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from api.infra.credentials import Credentials
from api.server import create_app
from api.server.connections import (
    CAP_SHARE_OF_FILES,
    CONNECTION_GUARD,
    SERVED_IDLE_GRACE_SECONDS,
    GuardedSite,
    connection_cap,
)
from api.settings import ServerSettings
from api.testing.waiting import wait_until_async
from tests.sockets import closed_within

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
SHORT = 0.5
HALF_A_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
WATCH = b"GET /apis/tofu-qemu.dev/v1alpha1/qemuvms?watch=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_documented_limits() -> None:
    """docs/operations.md "Connections and streams": every number there."""
    defaults = ServerSettings()
    assert defaults.max_connections == 1024
    assert defaults.header_timeout_seconds == 10.0
    assert defaults.keepalive_timeout_seconds == 30.0
    assert defaults.body_timeout_seconds == 60.0
    assert defaults.allowed_hosts is None
    assert (defaults.max_watches, defaults.max_watches_per_principal) == (100, 50)
    assert (defaults.max_follows, defaults.max_follows_per_principal) == (32, 16)
    assert defaults.watch_bookmark_seconds == 15.0
    assert defaults.follow_timeout_seconds == 3600
    assert CAP_SHARE_OF_FILES == 2
    assert SERVED_IDLE_GRACE_SECONDS == 0.5


@pytest.mark.parametrize(
    ("setting", "open_files", "cap"),
    [(1024, 1024, 512), (1024, 1_048_576, 1024), (100, 1024, 100), (1024, 1, 1)],
)
def test_the_cap_is_the_setting_within_half_the_open_files(setting: int, open_files: int, cap: int) -> None:
    assert connection_cap(setting, open_files) == cap


@pytest.fixture
async def listener(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[tuple[int, web.Application]]:
    """The app without credentials, behind a GuardedSite with 4 connections and short deadlines."""
    settings = ServerSettings(
        data_dir=tmp_path / "data",
        listen=f"127.0.0.1:{unused_tcp_port}",
        max_connections=4,
        header_timeout_seconds=SHORT,
        keepalive_timeout_seconds=SHORT,
        body_timeout_seconds=SHORT,
    )
    app = create_app(settings, credentials=Credentials())
    guard = app[CONNECTION_GUARD]
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=guard.limits.keepalive_timeout)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", unused_tcp_port, guard=guard)
    await site.start()
    try:
        yield unused_tcp_port, app
    finally:
        await runner.cleanup()


async def test_a_half_sent_header_is_closed_after_the_header_timeout(
    listener: tuple[int, web.Application],
) -> None:
    port, _app = listener
    reader, _writer = await _open(port, HALF_A_REQUEST)
    started = time.monotonic()
    assert await closed_within(reader, SHORT + 2.0)
    assert time.monotonic() - started >= SHORT - 0.1


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    listener: tuple[int, web.Application],
) -> None:
    port, _app = listener
    reader, writer = await _open(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert await closed_within(reader, SHORT + 2.0)
    assert time.monotonic() - started >= SHORT - 0.1
    writer.close()


async def test_a_slow_body_gets_408(listener: tuple[int, web.Application]) -> None:
    port, _app = listener
    reader, _writer = await _open(
        port, b'POST /state/lab HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"ver'
    )
    status, body, _headers = await _answer(reader)
    assert status == 408
    assert body["code"] == 408
    assert "did not arrive within 0.5 s" in body["message"]


async def test_at_the_cap_the_oldest_idle_connection_makes_room_for_a_probe(
    listener: tuple[int, web.Application],
) -> None:
    port, app = listener
    guard = app[CONNECTION_GUARD]
    assert guard.cap == 4
    half_sent = [await _open(port, HALF_A_REQUEST) for _ in range(4)]
    await wait_until_async(lambda: guard.open_count == 4)
    reader, _writer = await _open(
        port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    status, _body, _headers = await _answer(reader)
    assert status == 200
    oldest_reader, _ = half_sent[0]
    assert await closed_within(oldest_reader, 0.5)
    assert guard.open_count <= 4


async def test_when_every_connection_is_in_a_request_a_new_one_gets_503(
    listener: tuple[int, web.Application],
) -> None:
    port, app = listener
    guard = app[CONNECTION_GUARD]
    watches = [await _open(port, WATCH) for _ in range(4)]
    for reader, _writer in watches:
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    reader, _writer = await _open(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, body, headers = await _answer(reader)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert body["reason"] == "ServiceUnavailable"
    assert "every connection slot is in a request" in body["message"]
    assert guard.open_count == 4


async def _open(port: int, data: bytes) -> Stream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and (lower-cased) headers of a Content-Length answer."""
    headers: dict[str, str] = {}
    async with asyncio.timeout(5):
        status = int((await reader.readline()).split()[1])
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body: dict[str, Any] = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
    return status, body, headers
