"""Removing kept state versions over HTTP: DELETE /state/{p} takes every version and the lock
with it, and purge-states (`tofu-qemu states purge`) removes the old ones on demand."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from api.client.commands import run_client
from api.testing.tfstate import encode, vm_state
from controller.cli import build_parser
from tests.component.conftest import AUTH

Client = TestClient[Any, Any]
PURGE = "/apis/tofu-qemu.dev/v1alpha1/projects/lab/purge-states"
VERSIONS = "/api/v1/projects/lab/states"


async def post_states(client: Client, *serials: int) -> None:
    for serial in serials:
        response = await client.post("/state/lab", data=encode(vm_state(serial, {"web": {}})), headers=AUTH)
        assert response.status == 200


async def kept_serials(client: Client) -> list[int]:
    response = await client.get(VERSIONS, headers=AUTH)
    assert response.status == 200
    return [version["serial"] for version in (await response.json())["items"]]


async def test_delete_removes_every_version_and_the_lock(client: Client) -> None:
    await post_states(client, 1, 2, 3)
    lock = json.dumps({"ID": "holder", "Who": "root@vm", "Operation": "OperationTypeApply"})
    assert (await client.request("LOCK", "/state/lab/lock", data=lock, headers=AUTH)).status == 200
    assert (await client.delete("/state/lab", params={"ID": "holder"}, headers=AUTH)).status == 200
    assert (await client.get(VERSIONS, headers=AUTH)).status == 404
    assert (await client.get(f"{VERSIONS}/1", headers=AUTH)).status == 404
    locks = await (await client.get("/apis/tofu-qemu.dev/v1alpha1/locks", headers=AUTH)).json()
    assert locks["items"] == []
    # UNLOCK by the former holder, as Terraform sends it after its DELETE, is still fine.
    assert (await client.request("UNLOCK", "/state/lab/lock", data=lock, headers=AUTH)).status == 200


async def test_purge_keeps_the_current_version_and_records_who_did_it(client: Client) -> None:
    await post_states(client, 1, 2, 3)
    response = await client.post(PURGE, headers=AUTH)
    assert response.status == 200
    assert await response.json() == {"project": "lab", "removed": 2, "kept": 1}
    assert await kept_serials(client) == [3]
    assert (await client.get("/state/lab", headers=AUTH)).status == 200
    events = await (await client.get("/apis/tofu-qemu.dev/v1alpha1/projects/lab/events", headers=AUTH)).json()
    assert [(e["reason"], e["message"]) for e in events["items"] if e["reason"] == "StatesPurged"] == [
        ("StatesPurged", "alice purged 2 state version(s); 1 kept")
    ]


async def test_purge_keeps_the_newest_on_request(client: Client) -> None:
    await post_states(client, 1, 2, 3, 4)
    response = await client.post(PURGE, json={"keep": 2}, headers=AUTH)
    assert await response.json() == {"project": "lab", "removed": 1, "kept": 3}
    assert await kept_serials(client) == [4, 3, 2]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b'{"keep": -1}', "keep", id="negative"),
        pytest.param(b'{"keep": "all"}', "keep", id="not-a-number"),
        pytest.param(b'{"kept": 1}', "kept", id="unknown-field"),
        pytest.param(b"[", "purge-states body", id="not-json"),
    ],
)
async def test_a_bad_purge_body_is_400_and_removes_nothing(client: Client, body: bytes, message: str) -> None:
    await post_states(client, 1, 2)
    response = await client.post(PURGE, data=body, headers=AUTH)
    assert response.status == 400
    assert message in (await response.json())["message"]
    assert await kept_serials(client) == [2, 1]


async def test_purge_of_an_unknown_project_is_404(client: Client) -> None:
    response = await client.post(PURGE, headers=AUTH)
    assert (response.status, (await response.json())["code"]) == (404, 404)


async def test_purge_needs_credentials(client: Client) -> None:
    await post_states(client, 1, 2)
    assert (await client.post(PURGE)).status == 401
    assert await kept_serials(client) == [2, 1]


def cli(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    """A client command of `tofu-qemu`, parsed as the command line is, printing into a string."""
    args = build_parser().parse_args(argv)
    out = io.StringIO()
    return run_client(args, env=env, out=out), out.getvalue()


async def test_the_cli_purges(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    """`tofu-qemu states purge PROJECT [--keep N]`, while `states PROJECT` still lists."""
    await post_states(client, 1, 2, 3, 4)
    env = {
        "TOFU_QEMU_SERVER": str(client.make_url("/")),
        "TOFU_QEMU_USERNAME": "alice",
        "TOFU_QEMU_PASSWORD": "s3cret",
    }
    status, out = await asyncio.to_thread(cli, "states", "purge", "lab", "--keep", "1", env=env)
    assert status == 0
    assert out == (
        "project lab: 2 old state version(s) removed, 2 kept"
        " (the current, the published and the --keep newest)\n"
    )
    assert await kept_serials(client) == [4, 3]
    status, out = await asyncio.to_thread(cli, "states", "lab", "-o", "json", env=env)
    assert [v["serial"] for v in json.loads(out)["items"]] == [4, 3]
    capsys.readouterr()
    assert await asyncio.to_thread(cli, "states", "lab", "extra", env=env) == (1, "")
    assert "use `states PROJECT` or `states purge PROJECT`" in capsys.readouterr().err
    assert await asyncio.to_thread(cli, "states", "purge", "nope", env=env) == (1, "")
    assert "project 'nope' does not exist" in capsys.readouterr().err
