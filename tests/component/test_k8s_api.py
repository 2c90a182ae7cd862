"""The Kubernetes-style API over HTTP: lists, selectors, objects, actions, console, events, locks,
and every answer checked against the served OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from api.server.console import serial_log_path
from api.server.routes import ROUTES
from api.settings import ServerSettings
from api.store import Database
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import instance, resource, vm_state
from tests.component.conftest import AUTH, FakeClock
from tests.component.k8s_support import (
    APIS,
    DOCUMENT,
    Client,
    Serve,
    api,
    checked_json,
    post_state,
    serve,
    validate,
)

__all__ = ["api", "serve"]  # fixtures
VM = f"{APIS}/projects/{{project}}/qemuvms/{{name}}"
LOCK_INFO = {
    "ID": "lock-1",
    "Operation": "OperationTypeApply",
    "Info": "",
    "Who": "bob@ci",
    "Version": "1.11.4",
    "Created": "2026-11-21T11:59:00Z",
    "Path": "",
}


async def declare_lab(api: Client) -> None:
    await post_state(
        api,
        "lab",
        vm_state(
            1,
            {
                "web": {"labels": {"app": "web", "env": "prod"}},
                "db": {"labels": {"app": "db", "env": "dev"}},
                "bare": {},
            },
        ),
    )
    await post_state(api, "other", vm_state(1, {"web": {"labels": {"app": "web"}}}))


async def counter(db: Database) -> int:
    rows = await db.read("SELECT value FROM resource_versions")
    return int(rows[0][0])


def names(body: dict[str, Any]) -> list[str]:
    return [f"{item['metadata']['project']}/{item['metadata']['name']}" for item in body["items"]]


# ---- Lists and objects --------------------------------------------------------------------------


async def test_the_list_is_kubernetes_shaped_with_the_store_counter(api: Client, db: Database) -> None:
    """apiVersion, kind QemuVMList, metadata.resourceVersion = the counter, every project's items."""
    await declare_lab(api)
    body = await checked_json(await api.get(f"{APIS}/qemuvms", headers=AUTH), f"{APIS}/qemuvms")
    assert (body["apiVersion"], body["kind"]) == ("tofu-qemu.dev/v1alpha1", "QemuVMList")
    assert body["metadata"]["resourceVersion"] == str(await counter(db))
    assert names(body) == ["lab/bare", "lab/db", "lab/web", "other/web"]
    item = body["items"][0]
    assert (item["apiVersion"], item["kind"]) == ("tofu-qemu.dev/v1alpha1", "QemuVM")
    assert set(item) == {"apiVersion", "kind", "metadata", "spec", "status"}


async def test_an_empty_store_lists_nothing_at_version_zero(api: Client) -> None:
    """No objects: an empty list whose resourceVersion is still the counter."""
    body = await checked_json(await api.get(f"{APIS}/qemuvms", headers=AUTH), f"{APIS}/qemuvms")
    assert (body["items"], body["metadata"]["resourceVersion"]) == ([], "0")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("app=web", ["lab/web", "other/web"], id="equals"),
        pytest.param("app==web,env=prod", ["lab/web"], id="and"),
        pytest.param("app!=web", ["lab/bare", "lab/db"], id="not-equals-includes-unlabelled"),
        pytest.param("env in (prod,dev)", ["lab/db", "lab/web"], id="in"),
        pytest.param("env notin (prod)", ["lab/bare", "lab/db", "other/web"], id="notin"),
        pytest.param("env", ["lab/db", "lab/web"], id="exists"),
        pytest.param("!app", ["lab/bare"], id="does-not-exist"),
    ],
)
async def test_label_selectors_filter_lists(api: Client, query: str, expected: list[str]) -> None:
    """?labelSelector= takes Kubernetes syntax and filters the items."""
    await declare_lab(api)
    response = await api.get(f"{APIS}/qemuvms", params={"labelSelector": query}, headers=AUTH)
    assert names(await checked_json(response, f"{APIS}/qemuvms")) == expected


async def test_project_scopes_a_list_by_path_or_query(api: Client) -> None:
    """/projects/{project}/qemuvms and ?project= give that project's objects only."""
    await declare_lab(api)
    path = f"{APIS}/projects/{{project}}/qemuvms"
    by_path = await checked_json(await api.get(f"{APIS}/projects/other/qemuvms", headers=AUTH), path)
    by_query = await checked_json(
        await api.get(f"{APIS}/qemuvms", params={"project": "other"}, headers=AUTH), f"{APIS}/qemuvms"
    )
    assert names(by_path) == names(by_query) == ["other/web"]


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        pytest.param("/qemuvms", {"labelSelector": "a in ()"}, "label selector", id="selector"),
        pytest.param("/qemuvms", {"labelSelector": "a b"}, "label selector", id="selector-words"),
        pytest.param("/qemuvms", {"watch": "maybe"}, "watch must be", id="watch-flag"),
        pytest.param("/qemuvms", {"resourceVersion": "x1"}, "resourceVersion must be", id="rv-text"),
        pytest.param("/qemuvms", {"resourceVersion": "-1"}, "resourceVersion must be", id="rv-negative"),
        pytest.param("/qemuvms", {"resourceVersion": "9" * 19}, "resourceVersion must be", id="rv-huge"),
        pytest.param("/qemuvms", {"timeoutSeconds": "0"}, "between 1 and 3600", id="timeout-zero"),
        pytest.param("/qemuvms", {"project": "../x"}, "project name", id="project-query"),
        pytest.param("/projects/lab/qemuvms", {"project": "other"}, "contradicts", id="project-mismatch"),
        pytest.param("/projects/lab/qemuvms/web/console", {"tailBytes": "2000000"}, "between", id="tail"),
        pytest.param("/projects/lab/qemuvms/web/events", {"limit": "0"}, "between 1 and", id="limit"),
        pytest.param("/projects/lab/qemuvms/web/events", {"afterId": "²"}, "afterId must be", id="after-id"),
    ],
)
async def test_bad_query_parameters_are_400_with_a_status(
    api: Client, path: str, params: dict[str, str], message: str
) -> None:
    """Each invalid value is a 400 whose JSON Status names the problem."""
    await declare_lab(api)
    response = await api.get(APIS + path, params=params, headers=AUTH)
    body = await response.json()
    assert (response.status, body["kind"], body["code"]) == (400, "Status", 400), body
    assert message in body["message"]


async def test_one_object_and_404(api: Client) -> None:
    """GET by name answers the object; an unknown name is a 404 Status."""
    await declare_lab(api)
    vm = await checked_json(await api.get(f"{APIS}/projects/lab/qemuvms/web", headers=AUTH), VM)
    assert (vm["metadata"]["name"], vm["metadata"]["labels"]) == ("web", {"app": "web", "env": "prod"})
    missing = await api.get(f"{APIS}/projects/lab/qemuvms/nope", headers=AUTH)
    assert missing.status == 404
    validate(await missing.json(), VM, "GET", 404)


# ---- Imperative actions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "reason", "stopped", "restart_requested"),
    [
        pytest.param("stop", "StopRequested", True, False, id="stop"),
        pytest.param("start", "StartRequested", False, False, id="start"),
        pytest.param("restart", "RestartRequested", False, True, id="restart"),
    ],
)
async def test_actions_set_the_override_not_the_spec(
    api: Client, action: str, reason: str, stopped: bool, restart_requested: bool
) -> None:
    """POST stop|start|restart sets status.override (by the principal), bumps resourceVersion,
    keeps spec and generation, records an event naming who asked, and answers the object."""
    await declare_lab(api)
    before = await (await api.get(f"{APIS}/projects/lab/qemuvms/web", headers=AUTH)).json()
    response = await api.post(f"{APIS}/projects/lab/qemuvms/web/{action}", headers=AUTH)
    after = await checked_json(response, f"{VM}/{action}")
    override = after["status"]["override"]
    assert (override["stopped"], override["requestedBy"]) == (stopped, "alice")
    assert (override["restartRequestedAt"] is not None) == restart_requested
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert int(after["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    assert after == await (await api.get(f"{APIS}/projects/lab/qemuvms/web", headers=AUTH)).json()
    events = await (await api.get(f"{APIS}/projects/lab/qemuvms/web/events", headers=AUTH)).json()
    [event] = [e for e in events["items"] if e["reason"] == reason]
    assert event["message"] == f"{action} requested by alice"
    assert (event["uid"], event["type"]) == (after["metadata"]["uid"], "Normal")


async def test_start_lifts_a_stop_and_the_bearer_principal_is_named(api: Client) -> None:
    """stop then start leaves stopped false; a bearer token's principal is the requester."""
    await declare_lab(api)
    await api.post(f"{APIS}/projects/lab/qemuvms/web/stop", headers=AUTH)
    response = await api.post(
        f"{APIS}/projects/lab/qemuvms/web/start", headers={"Authorization": "Bearer tok-1"}
    )
    override = (await response.json())["status"]["override"]
    assert override["stopped"] is False
    assert override["requestedBy"] not in ("", "alice")


@pytest.mark.parametrize("action", ["stop", "start", "restart"])
async def test_actions_on_unknown_vms_are_404(api: Client, action: str) -> None:
    """No live VM of that name: 404 Status, and no event."""
    await declare_lab(api)
    response = await api.post(f"{APIS}/projects/lab/qemuvms/nope/{action}", headers=AUTH)
    validate(await response.json(), f"{VM}/{action}", "POST", 404)
    assert response.status == 404
    events = await (await api.get(f"{APIS}/projects/lab/qemuvms/nope/events", headers=AUTH)).json()
    assert events["items"] == []


# ---- Console -----------------------------------------------------------------------------------


async def uid_of(api: Client, name: str = "web") -> str:
    vm = await (await api.get(f"{APIS}/projects/lab/qemuvms/{name}", headers=AUTH)).json()
    return str(vm["metadata"]["uid"])


def console_log(settings: ServerSettings, uid: str) -> Path:
    path = serial_log_path(settings.data_dir, uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def test_console_without_a_log_is_404(api: Client) -> None:
    """A VM that never started has no log: 404 with a Status that says so."""
    await declare_lab(api)
    response = await api.get(f"{APIS}/projects/lab/qemuvms/web/console", headers=AUTH)
    body = await response.json()
    assert response.status == 404
    validate(body, f"{VM}/console", "GET", 404)
    assert "no console log yet" in body["message"]


async def test_console_serves_the_tail_as_utf8_text(api: Client, settings: ServerSettings) -> None:
    """tailBytes bytes from the end; control characters kept, invalid UTF-8 replaced."""
    await declare_lab(api)
    console_log(settings, await uid_of(api)).write_bytes(b"old line\n" + b"boot \x1b[1mok\x1b[0m \xff\n")
    response = await api.get(f"{APIS}/projects/lab/qemuvms/web/console", headers=AUTH)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await response.text() == "old line\nboot \x1b[1mok\x1b[0m \ufffd\n"
    tail = await api.get(f"{APIS}/projects/lab/qemuvms/web/console", params={"tailBytes": "5"}, headers=AUTH)
    assert await tail.text() == "0m \ufffd\n"


async def test_console_follow_streams_appends_and_restarts_after_truncation(
    api: Client, settings: ServerSettings, db: Database
) -> None:
    """follow=true sends what is appended; when QEMU starts again (status.startedAt changes) and
    truncates the log, the stream starts over from the new log's first byte."""
    await declare_lab(api)
    uid = await uid_of(api)
    log = console_log(settings, uid)
    log.write_bytes(b"first boot\n")
    response = await api.get(
        f"{APIS}/projects/lab/qemuvms/web/console", params={"follow": "true"}, headers=AUTH
    )
    assert response.status == 200
    assert await read_until(response, b"first boot\n") == b"first boot\n"
    with log.open("ab") as file:
        file.write(b"appended\n")
    assert await read_until(response, b"appended\n") == b"appended\n"

    # QEMU restarted: O_TRUNC on the same inode, and the new log is already longer.
    with log.open("r+b") as file:
        file.truncate(0)
        file.write(b"second boot, a longer first line\n")
    await VMStatusWriter(db).write_status(uid, {"phase": "Running", "startedAt": "2026-11-21T12:05:00Z"})
    assert await read_until(response, b"line\n") == b"second boot, a longer first line\n"
    response.close()


async def read_until(response: Any, marker: bytes) -> bytes:
    data = b""
    async with asyncio.timeout(5):
        while not data.endswith(marker):
            data += await response.content.readany()
    return data


async def test_console_follow_ends_when_the_log_goes(api: Client, settings: ServerSettings) -> None:
    """The runtime dir removed (the VM was finalized): the follow ends."""
    await declare_lab(api)
    log = console_log(settings, await uid_of(api))
    log.write_bytes(b"x\n")
    response = await api.get(f"{APIS}/projects/lab/qemuvms/web/console", params={"follow": "1"}, headers=AUTH)
    assert await read_until(response, b"x\n") == b"x\n"
    os.unlink(log)
    async with asyncio.timeout(5):
        assert await response.content.read() == b""


def test_the_console_path_derives_from_a_uuid_only(tmp_path: Path) -> None:
    """DATA/run/<uid>/serial.log, and nothing that is not a UUID becomes a path."""
    uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert serial_log_path(tmp_path, uid) == tmp_path / "run" / uid / "serial.log"
    for hostile in ("../etc", "/etc/passwd", "a/b", ""):
        with pytest.raises(ValueError, match=r"hexadecimal UUID|badly formed"):
            serial_log_path(tmp_path, hostile)


# ---- Events -------------------------------------------------------------------------------------


async def test_events_page_forwards_with_after_id(api: Client) -> None:
    """Events come oldest first with ids; afterId returns only newer ones; limit bounds them."""
    await declare_lab(api)
    for action in ("stop", "start", "restart"):
        await api.post(f"{APIS}/projects/lab/qemuvms/web/{action}", headers=AUTH)
    path = f"{VM}/events"
    everything = await checked_json(
        await api.get(f"{APIS}/projects/lab/qemuvms/web/events", headers=AUTH), path
    )
    assert everything["kind"] == "EventList"
    reasons = [e["reason"] for e in everything["items"]]
    assert reasons[-3:] == ["StopRequested", "StartRequested", "RestartRequested"]
    ids = [e["id"] for e in everything["items"]]
    assert ids == sorted(ids)
    newer = await checked_json(
        await api.get(
            f"{APIS}/projects/lab/qemuvms/web/events", params={"afterId": str(ids[-2])}, headers=AUTH
        ),
        path,
    )
    assert [e["reason"] for e in newer["items"]] == ["RestartRequested"]
    limited = await (
        await api.get(f"{APIS}/projects/lab/qemuvms/web/events", params={"limit": "1"}, headers=AUTH)
    ).json()
    assert [e["reason"] for e in limited["items"]] == ["RestartRequested"]


# ---- Locks --------------------------------------------------------------------------------------


async def lock(api: Client, project: str, info: dict[str, str]) -> None:
    response = await api.request("LOCK", f"/state/{project}/lock", data=json.dumps(info), headers=AUTH)
    assert response.status == 200


async def test_locks_are_listed_with_holder_and_age(api: Client, clock: FakeClock) -> None:
    """Every held lock: project, ID, Who, Operation, Created, lockedAt and its age."""
    await declare_lab(api)
    await lock(api, "lab", LOCK_INFO)
    clock.advance(90)
    body = await checked_json(await api.get(f"{APIS}/locks", headers=AUTH), f"{APIS}/locks")
    [held] = body["items"]
    assert body["kind"] == "LockList"
    assert {k: held[k] for k in ("project", "id", "who", "operation", "created", "ageSeconds")} == {
        "project": "lab",
        "id": "lock-1",
        "who": "bob@ci",
        "operation": "OperationTypeApply",
        "created": "2026-11-21T11:59:00Z",
        "ageSeconds": 90.0,
    }
    assert held["info"] == LOCK_INFO


async def test_force_unlock_with_a_wrong_id_is_409_and_keeps_the_lock(api: Client) -> None:
    """{"id": ...} naming another lock: 409 Status, nothing released."""
    await declare_lab(api)
    await lock(api, "lab", LOCK_INFO)
    path = f"{APIS}/projects/{{project}}/force-unlock"
    response = await api.post(f"{APIS}/projects/lab/force-unlock", json={"id": "other"}, headers=AUTH)
    body = await checked_json(response, path, 409)
    assert "lock-1" in body["message"]
    assert len((await (await api.get(f"{APIS}/locks", headers=AUTH)).json())["items"]) == 1


@pytest.mark.parametrize("body", [{"id": "lock-1"}, None], ids=["matching-id", "no-body"])
async def test_force_unlock_releases_and_records_who_did_it(api: Client, body: dict[str, str] | None) -> None:
    """The right ID (or none, as terraform force-unlock) releases the lock, answers it, and
    records a project-level ForceUnlocked event with the holder's info and the principal."""
    await declare_lab(api)
    await lock(api, "lab", LOCK_INFO)
    response = await api.post(f"{APIS}/projects/lab/force-unlock", json=body, headers=AUTH)
    released = await checked_json(response, f"{APIS}/projects/{{project}}/force-unlock")
    assert (released["id"], released["who"]) == ("lock-1", "bob@ci")
    assert (await (await api.get(f"{APIS}/locks", headers=AUTH)).json())["items"] == []
    events = await checked_json(
        await api.get(f"{APIS}/projects/lab/events", headers=AUTH), f"{APIS}/projects/{{project}}/events"
    )
    [event] = [e for e in events["items"] if e["reason"] == "ForceUnlocked"]
    assert (event["uid"], event["vmName"]) == ("", "")
    for part in (
        "alice",
        "ID=lock-1",
        "Who=bob@ci",
        "Operation=OperationTypeApply",
        "Created=2026-11-21T11:59:00Z",
    ):
        assert part in event["message"]
    # The lock is free again for Terraform.
    await lock(api, "lab", {**LOCK_INFO, "ID": "lock-2"})


@pytest.mark.parametrize(
    ("project", "body", "status"),
    [
        pytest.param("lab", b"", 409, id="not-locked"),
        pytest.param("nowhere", b"", 404, id="unknown-project"),
        pytest.param("lab", b"[1]", 400, id="body-not-an-object"),
        pytest.param("lab", b'{"id": ""}', 400, id="empty-id"),
        pytest.param("lab", b'{"ID": "x"}', 400, id="unknown-field"),
    ],
)
async def test_force_unlock_refusals(api: Client, project: str, body: bytes, status: int) -> None:
    """Nothing locked is 409, an unknown project 404, a malformed body 400: each a Status."""
    await declare_lab(api)
    response = await api.post(f"{APIS}/projects/{project}/force-unlock", data=body, headers=AUTH)
    await checked_json(response, f"{APIS}/projects/{{project}}/force-unlock", status)


# ---- The OpenAPI document -----------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{(\w+)\}")
SAMPLES = {"project": "lab", "name": "web"}


def new_api_get_routes() -> list[str]:
    return sorted({r.path for r in ROUTES if r.method == "GET" and r.path.startswith(APIS)})


def with_types_named_web(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with a QemuInstanceType, a QemuPreference (docs/instancetypes.md), a
    QemuVMSnapshot and a QemuVMRestore (docs/snapshots.md), each named web."""
    types = [
        {"apiVersion": "tofu-qemu.dev/v1alpha1", "kind": kind, "metadata": {"name": "web"}, "spec": spec}
        for kind, spec in (
            ("QemuInstanceType", {"cpus": 1, "memory": 64}),
            ("QemuPreference", {"stopTimeout": 5}),
            ("QemuVMSnapshot", {"source": {"name": "web"}}),
            ("QemuVMRestore", {"target": {"name": "web"}, "snapshot": "web"}),
        )
    ]
    return {
        **document,
        "resources": [*document["resources"], resource("types", [instance(t) for t in types])],
    }


@pytest.mark.parametrize("template", new_api_get_routes())
async def test_every_get_of_the_new_api_answers_what_the_document_says(
    serve: Serve, settings: ServerSettings, template: str
) -> None:
    """A 200 from each GET route validates against its documented schema."""
    cluster = {
        "instance_types": {"web": {"cpus": 1, "memory": 64}},
        "preferences": {"web": {"stopTimeout": 5}},
    }
    api = await serve(**cluster)
    await declare_lab(api)
    await post_state(api, "other", with_types_named_web(vm_state(2, {"web": {"labels": {"app": "web"}}})))
    await lock(api, "lab", LOCK_INFO)
    await api.post(f"{APIS}/projects/lab/qemuvms/web/restart", headers=AUTH)
    console_log(settings, await uid_of(api)).write_bytes(b"hello\n")
    samples = SAMPLES if re.search(r"/qemuvms(/|$)", template) else {**SAMPLES, "project": "other"}
    response = await api.get(PLACEHOLDER.sub(lambda m: samples[m[1]], template), headers=AUTH)
    assert response.status == 200, await response.text()
    content_type = response.headers["Content-Type"].split(";")[0]
    documented = DOCUMENT["paths"][template]["get"]["responses"]["200"]["content"]
    assert content_type in documented
    if content_type == "application/json":
        body = await response.json()
        validate(body, template, "GET", 200)
        assert body.get("items") != [], "an empty list proves little"


async def test_the_document_is_served_and_needs_auth(api: Client) -> None:
    """GET /openapi.json answers the document to authenticated clients only."""
    assert (await api.get("/openapi.json")).status == 401
    response = await api.get("/openapi.json", headers=AUTH)
    assert (await response.json()) == json.loads(json.dumps(DOCUMENT))


async def test_the_deleted_event_and_tombstone_come_with_finalize(api: Client, db: Database) -> None:
    """Finalize removes the row, keeps a tombstone at the next resourceVersion and records Deleted."""
    await declare_lab(api)
    uid = await uid_of(api, "db")
    await post_state(api, "lab", vm_state(2, {"web": {}, "bare": {}}))
    before = await counter(db)
    await VMStatusWriter(db).finalize(uid)
    await VMStatusWriter(db).finalize(uid)  # idempotent: nothing more happens
    [row] = await db.read("SELECT resource_version, object FROM vm_tombstones WHERE uid = ?", (uid,))
    assert row[0] == before + 1 == await counter(db)
    tombstone = json.loads(row[1])
    assert tombstone["metadata"]["resourceVersion"] == str(before + 1)
    assert tombstone["metadata"]["deletionTimestamp"] is not None
    events = await (await api.get(f"{APIS}/projects/lab/qemuvms/db/events", headers=AUTH)).json()
    assert [e["reason"] for e in events["items"]][-1] == "Deleted"
