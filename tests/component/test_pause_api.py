"""POST .../pause and .../unpause over HTTP: the override they record, the event naming who
asked, what they leave of stop and restart, and their answers checked against the OpenAPI
document (the controller's side is tests/unit/test_reconciler_pause.py)."""

from __future__ import annotations

from typing import Any

import pytest

from api.store import Database
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import vm_state
from tests.component.conftest import AUTH
from tests.component.k8s_support import APIS, Client, api, checked_json, post_state, serve, validate

__all__ = ["api", "serve"]  # fixtures
VM = f"{APIS}/projects/{{project}}/qemuvms/{{name}}"
WEB = f"{APIS}/projects/lab/qemuvms/web"


async def declare(api: Client) -> None:
    await post_state(api, "lab", vm_state(1, {"web": {}}))


async def act(api: Client, action: str) -> dict[str, Any]:
    body: dict[str, Any] = await checked_json(
        await api.post(f"{WEB}/{action}", headers=AUTH), f"{VM}/{action}"
    )
    return body


async def reasons(api: Client) -> list[tuple[str, str]]:
    events = await (await api.get(f"{WEB}/events", headers=AUTH)).json()
    return [(event["reason"], event["message"]) for event in events["items"]]


async def test_pause_records_when_and_who_and_keeps_the_spec(api: Client) -> None:
    await declare(api)
    before = await (await api.get(WEB, headers=AUTH)).json()
    after = await act(api, "pause")
    override = after["status"]["override"]
    assert override["pauseRequestedAt"] is not None
    assert override["unpauseRequestedAt"] is None
    assert (override["stopped"], override["requestedBy"]) == (False, "alice")
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    assert ("PauseRequested", "pause requested by alice") in await reasons(api)


async def test_unpause_lifts_the_pause_and_is_an_event_of_its_own(api: Client) -> None:
    await declare(api)
    await act(api, "pause")
    override = (await act(api, "unpause"))["status"]["override"]
    assert override["pauseRequestedAt"] is None
    assert override["unpauseRequestedAt"] is not None
    assert [reason for reason, _ in await reasons(api)][-2:] == ["PauseRequested", "UnpauseRequested"]


async def test_pause_and_stop_do_not_undo_each_other(api: Client) -> None:
    """A stop keeps the pause asked before it (and a pause the stop), so neither request is lost."""
    await declare(api)
    await act(api, "pause")
    override = (await act(api, "stop"))["status"]["override"]
    assert (override["stopped"], override["pauseRequestedAt"] is not None) == (True, True)
    override = (await act(api, "unpause"))["status"]["override"]
    assert (override["stopped"], override["pauseRequestedAt"]) == (True, None)


@pytest.mark.parametrize("action", ["pause", "unpause"])
async def test_pause_of_an_unknown_vm_is_404_and_records_nothing(api: Client, action: str) -> None:
    await declare(api)
    response = await api.post(f"{APIS}/projects/lab/qemuvms/nope/{action}", headers=AUTH)
    validate(await response.json(), f"{VM}/{action}", "POST", 404)
    assert response.status == 404


@pytest.mark.parametrize("action", ["pause", "unpause"])
async def test_pause_needs_authentication(api: Client, action: str) -> None:
    await declare(api)
    response = await api.post(f"{WEB}/{action}")
    assert response.status == 401
    assert (await (await api.get(WEB, headers=AUTH)).json())["status"].get("override") is None


async def test_kubectl_tables_show_a_paused_vm_as_paused_and_not_ready(api: Client, db: Database) -> None:
    """The phase column of `kubectl get qemuvms` (the same columns as `tofu-qemu get vms`)."""
    await declare(api)
    uid = (await act(api, "pause"))["metadata"]["uid"]
    ready = {"type": "Ready", "status": "False", "reason": "PausedByRequest", "message": "paused",
             "lastTransitionTime": "2026-11-21T12:05:00Z"}  # fmt: skip
    await VMStatusWriter(db).write_status(uid, {"phase": "Paused", "pid": 4242, "conditions": [ready]})
    table_accept = {**AUTH, "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    response = await api.get(f"{APIS}/namespaces/lab/qemuvms", headers=table_accept)
    table = await response.json()
    headers = [column["name"].upper() for column in table["columnDefinitions"]]
    [row] = table["rows"]
    cells = dict(zip(headers, row["cells"], strict=True))
    assert (cells["NAME"], cells["PHASE"], cells["READY"]) == ("web", "Paused", "False")
