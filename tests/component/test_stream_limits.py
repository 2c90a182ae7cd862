"""Stream limits are settings, per principal as well as in all, and console follows end by
default (issue 15, Low): one user or token cannot hold every watch or follow, nor hold one open
forever."""

from __future__ import annotations

import asyncio
import time

from api.server.streams import StreamKind, StreamLimit, stream_limits
from api.settings import ServerSettings
from tests.component.conftest import AUTH
from tests.component.k8s_support import APIS, Client, Serve, api, serve
from tests.component.test_k8s_api import console_log, declare_lab, read_until, uid_of

__all__ = ["api", "serve"]  # fixtures
LIST = f"{APIS}/qemuvms"
TOKEN = {"Authorization": "Bearer tok-1"}
CONSOLE = f"{APIS}/projects/lab/qemuvms/web/console"


def test_limits_come_from_the_settings() -> None:
    assert stream_limits(ServerSettings()) == {
        StreamKind.WATCH: StreamLimit(total=100, per_principal=50),
        StreamKind.FOLLOW: StreamLimit(total=32, per_principal=16),
    }


async def test_one_principal_cannot_take_every_watch(serve: Serve) -> None:
    api = await serve(max_watches=3, max_watches_per_principal=1)
    first = await api.get(LIST, params={"watch": "1"}, headers=AUTH)
    assert first.status == 200
    second = await api.get(LIST, params={"watch": "1"}, headers=AUTH)
    body = await second.json()
    assert (second.status, body["code"], second.headers["Retry-After"]) == (429, 429, "5")
    assert "'alice' has 1 watch streams open" in body["message"]
    # Another principal still gets one.
    other = await api.get(LIST, params={"watch": "1"}, headers=TOKEN)
    assert other.status == 200
    first.close()
    other.close()


async def test_one_principal_cannot_take_every_follow(serve: Serve, settings: ServerSettings) -> None:
    api = await serve(max_follows=3, max_follows_per_principal=1)
    await declare_lab(api)
    console_log(settings, await uid_of(api)).write_bytes(b"boot\n")
    first = await api.get(CONSOLE, params={"follow": "1"}, headers=AUTH)
    assert first.status == 200
    second = await api.get(CONSOLE, params={"follow": "1"}, headers=AUTH)
    assert second.status == 429
    assert "'alice' has 1 follow streams open" in (await second.json())["message"]
    other = await api.get(CONSOLE, params={"follow": "1"}, headers=TOKEN)
    assert other.status == 200
    first.close()
    other.close()


async def test_the_total_limit_holds_across_principals(serve: Serve) -> None:
    api = await serve(max_watches=1)
    first = await api.get(LIST, params={"watch": "1"}, headers=AUTH)
    refused = await api.get(LIST, params={"watch": "1"}, headers=TOKEN)
    assert refused.status == 429
    assert "1 watch streams are open" in (await refused.json())["message"]
    first.close()


async def test_a_follow_ends_after_follow_timeout_seconds_by_default(
    serve: Serve, settings: ServerSettings
) -> None:
    api = await serve(follow_timeout_seconds=1)
    await declare_lab(api)
    console_log(settings, await uid_of(api)).write_bytes(b"boot\n")
    response = await api.get(CONSOLE, params={"follow": "1"}, headers=AUTH)
    assert await read_until(response, b"boot\n") == b"boot\n"
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert await response.content.read() == b""
    assert time.monotonic() - started < 4


async def test_a_follow_without_an_end_is_refused(api: Client) -> None:
    """timeoutSeconds=0 meant "no limit"; now every follow ends (1 to 86400 s)."""
    await declare_lab(api)
    response = await api.get(CONSOLE, params={"follow": "1", "timeoutSeconds": "0"}, headers=AUTH)
    assert response.status == 400
    assert "between 1 and 86400" in (await response.json())["message"]
