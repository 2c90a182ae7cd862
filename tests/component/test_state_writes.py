"""State writes over real HTTP: the body stored is the one received, hashed once, and parsed on a
thread while the event loop keeps answering."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.server import backend
from api.server.keys import STATES
from api.settings import ServerSettings
from api.state_reader import read_state
from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH
from tests.component.test_http_backend import md5_header

Client = TestClient[Any, Any]
MakeClient = Callable[[ServerSettings], Awaitable[Client]]
# Terraform's layout with what a re-serialisation would change: escapes, key order, spacing.
ODD_BODY = (
    b'{"version": 4,  "lineage":"l\\u00e9", "serial":3,\n\t"terraform_version":"1.11.4",'
    b'"outputs":{"z":{"value":"\\ud83d\\ude00 \\/ 1.0e2","type":"string"},'
    b'"a":{"value":1.50,"type":"number"}},'
    b'"resources":[],"check_results":null}  \n'
)


async def test_stored_body_is_the_received_bytes(client: Client) -> None:
    """Escapes, key order, spacing and number spelling survive: nothing is re-serialised."""
    response = await client.post("/state/lab", data=ODD_BODY, headers=md5_header(ODD_BODY))
    assert response.status == 200
    served = await client.get("/state/lab", headers=AUTH)
    assert await served.read() == ODD_BODY
    stored = await client.app[STATES].read("lab")
    assert stored.md5 == hashlib.md5(ODD_BODY, usedforsecurity=False).hexdigest()


async def test_body_is_hashed_once(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """One MD5 serves the Content-MD5 check and the stored digest."""
    hashed: list[int] = []
    real_md5 = hashlib.md5

    def counting(data: bytes, **kwargs: Any) -> Any:
        hashed.append(len(data))
        return real_md5(data, **kwargs)

    body = encode(vm_state(1, {"web": {}}))
    headers = md5_header(body)
    monkeypatch.setattr(hashlib, "md5", counting)
    response = await client.post("/state/lab", data=body, headers=headers)
    assert response.status == 200
    assert hashed == [len(body)]


async def test_large_state_is_parsed_off_the_loop_while_healthz_answers(
    make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parse of a 1,000-VM state waits, on its thread, until /healthz has been answered:
    had it run on the event loop, /healthz could not be answered and the parse would give up."""
    client = await make_client(ServerSettings(data_dir=tmp_path / "big", max_body_bytes=16 * 1024 * 1024))
    parse_started, healthz_answered = threading.Event(), threading.Event()
    parse_threads: list[str] = []

    def read_state_after_healthz(body: bytes) -> Any:
        parse_threads.append(threading.current_thread().name)
        parse_started.set()
        if not healthz_answered.wait(timeout=10):
            raise AssertionError("/healthz was not answered while the state was being parsed")
        return read_state(body)

    monkeypatch.setattr(backend, "read_state", read_state_after_healthz)
    body = encode(vm_state(1, {f"vm-{i}": {} for i in range(1000)}))
    assert len(body) > backend._PARSE_IN_THREAD_BYTES
    post = asyncio.create_task(client.post("/state/lab", data=body, headers=md5_header(body)))
    assert await asyncio.to_thread(parse_started.wait, 30)
    health = await client.get("/healthz")
    assert health.status == 200
    healthz_answered.set()
    response = await post
    assert response.status == 200
    assert parse_threads[0].startswith("state-parse")
    assert (await (await client.get("/state/lab", headers=AUTH)).read()) == body


def test_parse_pool_is_bounded() -> None:
    """The GIL serialises parsing: more threads would only queue more work at once."""
    assert backend.PARSE_THREADS == 2
    assert backend._PARSER._max_workers == backend.PARSE_THREADS
