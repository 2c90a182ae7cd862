"""The http state backend over real HTTP: status codes and bodies as docs/backend.md describes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.testing.tfstate import encode, vm_state
from tests.component.conftest import AUTH

Client = TestClient[Any, Any]
STATE = "/state/lab"
LOCK = "/state/lab/lock"


def lock_body(lock_id: str) -> bytes:
    """A lock info body exactly as Terraform 1.11 sends it."""
    return json.dumps(
        {
            "ID": lock_id,
            "Operation": "OperationTypeApply",
            "Info": "",
            "Who": "root@vm",
            "Version": "1.11.4",
            "Created": "2026-11-21T22:42:33.973646566Z",
            "Path": "",
        },
        separators=(",", ":"),
    ).encode()


def md5_header(body: bytes) -> dict[str, str]:
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    return {"Content-MD5": base64.b64encode(digest).decode(), **AUTH}


async def post_state(client: Client, document: dict[str, Any], *, lock_id: str | None = None) -> int:
    body = encode(document)
    params = {"ID": lock_id} if lock_id else {}
    response = await client.post(STATE, data=body, params=params, headers=md5_header(body))
    return response.status


async def test_get_without_state_is_204(client: Client) -> None:
    """No state yet: 204, which every client reads as "empty"."""
    response = await client.get(STATE, headers=AUTH)
    assert response.status == 204


async def test_post_then_get_returns_the_exact_bytes(client: Client) -> None:
    """The stored state is served back byte for byte."""
    body = encode(vm_state(1, {"web": {}}))
    response = await client.post(STATE, data=body, headers=md5_header(body))
    assert response.status == 200
    got = await client.get(STATE, headers=AUTH)
    assert (got.status, await got.read()) == (200, body)


async def test_put_update_method_works(client: Client) -> None:
    """update_method=PUT stores like POST."""
    body = encode(vm_state(1, {}))
    assert (await client.put(STATE, data=body, headers=md5_header(body))).status == 200
    assert (await client.get(STATE, headers=AUTH)).status == 200


async def test_lock_conflict_is_423_with_the_holders_full_info(client: Client) -> None:
    """The loser gets 423 and the holder's lock JSON verbatim, ID included."""
    assert (await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)).status == 200
    response = await client.request("LOCK", LOCK, data=lock_body("other"), headers=AUTH)
    assert response.status == 423
    assert await response.read() == lock_body("holder")


async def test_lock_is_idempotent_for_the_same_id(client: Client) -> None:
    """A retried LOCK by the holder answers 200 again."""
    for _ in range(2):
        assert (await client.request("LOCK", LOCK, data=lock_body("a"), headers=AUTH)).status == 200


async def test_write_with_wrong_id_is_409_with_holder(client: Client) -> None:
    """A writer that lost its lock gets 409 naming the current holder."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    body = encode(vm_state(1, {}))
    response = await client.post(STATE, data=body, params={"ID": "loser"}, headers=md5_header(body))
    assert response.status == 409
    assert json.loads(await response.read())["ID"] == "holder"


async def test_write_without_id_while_locked_is_423(client: Client) -> None:
    """-lock=false cannot overwrite a running apply."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    assert await post_state(client, vm_state(1, {})) == 423


async def test_write_with_holder_id_and_reordered_query(client: Client) -> None:
    """?ID= is found among other, re-ordered query parameters (docs/backend.md#requests-on-the-wire)."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    body = encode(vm_state(1, {}))
    response = await client.post(f"{STATE}?a=1&ID=holder&zone=eu", data=body, headers=md5_header(body))
    assert response.status == 200


@pytest.mark.parametrize(
    "unlock_body",
    [
        pytest.param(b"", id="terraform-empty-body"),
        pytest.param(
            b'{"ID":"holder","Operation":"","Info":"","Who":"","Version":"","Created":"0001-01-01T00:00:00Z","Path":""}',
            id="opentofu-1.10-force-unlock",
        ),
        pytest.param(lock_body("holder"), id="normal-release"),
    ],
)
async def test_unlock_releases(client: Client, unlock_body: bytes) -> None:
    """Matching ID or an empty body (force-unlock) releases; the next LOCK succeeds."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    assert (await client.request("UNLOCK", LOCK, data=unlock_body, headers=AUTH)).status == 200
    assert (await client.request("LOCK", LOCK, data=lock_body("next"), headers=AUTH)).status == 200


async def test_unlock_with_chunked_empty_body(client: Client) -> None:
    """Terraform's force-unlock sends an empty chunked body (docs/backend.md#requests-on-the-wire)."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)

    async def empty_chunks() -> Any:
        if False:  # pragma: no cover - an async generator that yields nothing
            yield b""

    response = await client.request("UNLOCK", LOCK, data=empty_chunks(), headers=md5_header(b""))
    assert response.status == 200
    info = await (await client.get("/api/v1/projects/lab", headers=AUTH)).json()
    assert info["lock"] is None


async def test_unlock_with_mismatching_id_is_409(client: Client) -> None:
    """Releasing someone else's lock by ID is refused with the holder's info."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    response = await client.request("UNLOCK", LOCK, data=lock_body("other"), headers=AUTH)
    assert response.status == 409
    assert json.loads(await response.read())["ID"] == "holder"


async def test_unlock_when_free_is_200(client: Client) -> None:
    """Unlocking an unlocked state is success (idempotent)."""
    assert (await client.request("UNLOCK", LOCK, data=b"", headers=AUTH)).status == 200


async def test_gitlab_style_lock_methods(client: Client) -> None:
    """lock_method=POST and unlock_method=DELETE on the lock URL work like LOCK/UNLOCK."""
    assert (await client.post(LOCK, data=lock_body("a"), headers=AUTH)).status == 200
    assert (await client.post(LOCK, data=lock_body("b"), headers=AUTH)).status == 423
    assert (await client.delete(LOCK, data=lock_body("a"), headers=AUTH)).status == 200


async def test_racing_locks_have_one_winner(client: Client) -> None:
    """20 clients race LOCK: one 200, nineteen 423 that all name the winner."""

    async def attempt(index: int) -> tuple[str, int, bytes]:
        response = await client.request("LOCK", LOCK, data=lock_body(f"id-{index}"), headers=AUTH)
        return f"id-{index}", response.status, await response.read()

    results = await asyncio.gather(*(attempt(i) for i in range(20)))
    winners = [lock_id for lock_id, status, _ in results if status == 200]
    assert len(winners) == 1
    losers = [json.loads(body)["ID"] for _, status, body in results if status == 423]
    assert losers == [winners[0]] * 19


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{not json", "not valid JSON", id="malformed"),
        pytest.param(b'{"version": 4}', "needs 'serial'", id="no-serial"),
        pytest.param(b"", "not valid JSON", id="empty"),
    ],
)
async def test_malformed_state_is_400_and_nothing_stored(client: Client, body: bytes, message: str) -> None:
    """A body that is not a state is refused with a JSON reason and leaves the old state."""
    await post_state(client, vm_state(1, {}))
    response = await client.post(STATE, data=body, headers=AUTH)
    assert response.status == 400
    assert message in (await response.json())["message"]
    stored = await client.get(STATE, headers=AUTH)
    assert json.loads(await stored.read())["serial"] == 1


async def test_too_large_body_is_413_json(client: Client) -> None:
    """Past max_body_bytes the answer is 413 with a JSON message."""
    body = b"{" + b" " * (300 * 1024) + b"}"
    response = await client.post(STATE, data=body, headers=AUTH)
    assert response.status == 413
    assert "larger than the limit of 262144 bytes" in (await response.json())["message"]


async def test_content_md5_mismatch_is_400(client: Client) -> None:
    """A body that does not match its Content-MD5 was damaged in transit: refused."""
    body = encode(vm_state(1, {}))
    headers = {**md5_header(b"something else")}
    response = await client.post(STATE, data=body, headers=headers)
    assert response.status == 400
    assert "Content-MD5" in (await response.json())["message"]


@pytest.mark.parametrize("project", ["..", "-x", "a%2Fb", "a%00", "x" * 129, "%C3%A9"])
async def test_invalid_project_names_are_400(client: Client, project: str) -> None:
    """Names that could become paths or options are refused with JSON."""
    response = await client.get(f"/state/{project}", headers=AUTH)
    assert response.status in (400, 404)
    if response.status == 400:
        assert "project name" in (await response.json())["message"]


async def test_malformed_lock_body_is_400(client: Client) -> None:
    """LOCK needs lock info with an ID."""
    response = await client.request("LOCK", LOCK, data=b'{"Who": "x"}', headers=AUTH)
    assert response.status == 400
    assert "non-empty string 'ID'" in (await response.json())["message"]


async def test_delete_state(client: Client) -> None:
    """DELETE (admin) removes the current state; GET then answers 204."""
    await post_state(client, vm_state(1, {"web": {}}))
    response = await client.delete(STATE, headers=AUTH)
    assert (response.status, (await response.json())["vmsMarkedForDeletion"]) == (200, 1)
    assert (await client.get(STATE, headers=AUTH)).status == 204
    assert (await client.delete(STATE, headers=AUTH)).status == 404


async def test_unknown_method_is_405_json(client: Client) -> None:
    """A method the backend does not serve gets 405 with a JSON body."""
    response = await client.patch(STATE, headers=AUTH)
    assert response.status == 405
    assert (await response.json())["code"] == 405


OPENTOFU_1_10_FORCE_UNLOCK = (
    '{"ID":"%s","Operation":"","Info":"","Who":"","Version":"","Created":"0001-01-01T00:00:00Z","Path":""}'
)


async def test_opentofu_1_10_force_unlock_with_wrong_id_is_409(client: Client) -> None:
    """OpenTofu >= 1.10 sends the typed ID on force-unlock, so a wrong one can be refused."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    body = (OPENTOFU_1_10_FORCE_UNLOCK % "typo").encode()
    response = await client.request("UNLOCK", LOCK, data=body, headers=md5_header(body))
    assert response.status == 409
    assert json.loads(await response.read())["ID"] == "holder"


async def test_opentofu_1_8_force_unlock_without_body_releases(client: Client) -> None:
    """OpenTofu 1.8-1.9 send UNLOCK with no body and no Content-Type: a force-unlock."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    assert (await client.request("UNLOCK", LOCK, headers=AUTH)).status == 200
    info = await (await client.get("/api/v1/projects/lab", headers=AUTH)).json()
    assert info["lock"] is None


async def test_opentofu_lock_timeout_retry_needs_id_in_conflict_body(client: Client) -> None:
    """OpenTofu >= 1.9 retries -lock-timeout only when the 423 body has an ID: it always does."""
    await client.request("LOCK", LOCK, data=lock_body("holder"), headers=AUTH)
    for attempt in range(3):
        response = await client.request("LOCK", LOCK, data=lock_body(f"waiter-{attempt}"), headers=AUTH)
        assert response.status == 423
        assert json.loads(await response.read())["ID"] == "holder"
