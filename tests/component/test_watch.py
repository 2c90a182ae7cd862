"""Watching QemuVMs: initial events, changes, resumption, 410, filters, bookmarks, limits, and
an end at timeoutSeconds and at server shutdown."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from api.server import create_app
from api.server.streams import install_streams
from api.settings import ServerSettings
from api.store import Database, StateStore, open_store
from api.store import watch as watch_store
from api.store.status_writer import VMStatusWriter
from api.testing.tfstate import vm_state
from tests.component.conftest import AUTH, FakeClock
from tests.component.k8s_support import (
    APIS,
    CREDENTIALS,
    Client,
    Serve,
    WatchReader,
    api,
    post_state,
    serve,
    validate,
)
from tests.component.test_store_states import write

__all__ = ["api", "serve"]  # fixtures
LIST = f"{APIS}/qemuvms"


async def open_watch(api: Client, path: str = LIST, **params: str) -> WatchReader:
    query = {"watch": "true", "allowWatchBookmarks": "true", **params}
    response = await api.get(path, params=query, headers=AUTH)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "application/json;stream=watch"
    return WatchReader(response)


async def next_checked(reader: WatchReader) -> dict[str, Any]:
    """The next non-bookmark event, checked against the document's WatchEvent schema."""
    event = await reader.next_change()
    validate(event, LIST, "GET", 200, "application/json;stream=watch")
    return event


def summary(event: dict[str, Any]) -> tuple[str, str]:
    return event["type"], event["object"]["metadata"]["name"]


async def uid_of(api: Client, name: str, project: str = "lab") -> str:
    vm = await (await api.get(f"{APIS}/projects/{project}/qemuvms/{name}", headers=AUTH)).json()
    return str(vm["metadata"]["uid"])


async def list_version(api: Client) -> int:
    return int((await (await api.get(LIST, headers=AUTH)).json())["metadata"]["resourceVersion"])


async def test_a_watch_starts_with_every_object_then_follows_each_change(api: Client, db: Database) -> None:
    """ADDED for each object and an initial-events-end BOOKMARK; then ADDED, MODIFIED (spec,
    status, deletion) and DELETED at finalize, in resourceVersion order."""
    await post_state(api, "lab", vm_state(1, {"a": {}, "b": {}}))
    reader = await open_watch(api)
    assert sorted([summary(await next_checked(reader)) for _ in range(2)]) == [("ADDED", "a"), ("ADDED", "b")]
    bookmark = await reader.next()
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert bookmark["object"]["metadata"]["resourceVersion"] == str(await list_version(api))
    validate(bookmark, LIST, "GET", 200, "application/json;stream=watch")

    await post_state(api, "lab", vm_state(2, {"a": {}, "b": {"memory": 512}, "c": {}}))
    changes = {summary(await next_checked(reader)) for _ in range(2)}
    assert changes == {("MODIFIED", "b"), ("ADDED", "c")}

    await VMStatusWriter(db).write_status(await uid_of(api, "a"), {"phase": "Running"})
    status_change = await next_checked(reader)
    assert summary(status_change) == ("MODIFIED", "a")
    assert status_change["object"]["status"]["phase"] == "Running"

    uid = await uid_of(api, "c")
    await post_state(api, "lab", vm_state(3, {"a": {}, "b": {"memory": 512}}))
    deleting = await next_checked(reader)
    assert summary(deleting) == ("MODIFIED", "c")
    assert deleting["object"]["metadata"]["deletionTimestamp"] is not None
    await VMStatusWriter(db).finalize(uid)
    deleted = await next_checked(reader)
    assert summary(deleted) == ("DELETED", "c")
    assert deleted["object"]["metadata"]["resourceVersion"] == str(await list_version(api))


async def test_resuming_sends_only_what_changed_after_the_version(api: Client, db: Database) -> None:
    """resourceVersion=N: objects changed after N as MODIFIED, removed ones as DELETED, nothing
    older; then the initial-events-end BOOKMARK at the current version."""
    await post_state(api, "lab", vm_state(1, {"a": {}, "b": {}, "c": {}}))
    uid_c = await uid_of(api, "c")
    await post_state(api, "lab", vm_state(2, {"a": {}, "b": {}}))
    version = await list_version(api)

    await VMStatusWriter(db).write_status(await uid_of(api, "b"), {"phase": "Running"})
    await VMStatusWriter(db).finalize(uid_c)
    await post_state(api, "lab", vm_state(3, {"a": {}, "b": {}, "d": {}}))

    reader = await open_watch(api, resourceVersion=str(version))
    events = [summary(await reader.next()) for _ in range(3)]
    assert events == [("MODIFIED", "b"), ("DELETED", "c"), ("MODIFIED", "d")]
    bookmark = await reader.next()
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["resourceVersion"] == str(await list_version(api))
    # Created after the watch began: the stream knows it is new.
    await post_state(api, "lab", vm_state(4, {"a": {}, "b": {}, "d": {}, "e": {}}))
    assert summary(await next_checked(reader)) == ("ADDED", "e")


async def test_a_version_older_than_the_tombstone_horizon_is_410_expired(
    api: Client, db: Database, clock: FakeClock
) -> None:
    """Once a tombstone past the version is pruned, resuming from it is 410 with reason Expired
    (as Kubernetes answers), and from the current version it still works."""
    await post_state(api, "lab", vm_state(1, {"a": {}, "b": {}}))
    old = await list_version(api)
    uid_a, uid_b = await uid_of(api, "a"), await uid_of(api, "b")
    await post_state(api, "lab", vm_state(2, {}))
    await VMStatusWriter(db).finalize(uid_a)
    clock.advance(watch_store.TOMBSTONE_RETENTION.total_seconds() + 1)
    await VMStatusWriter(db).finalize(uid_b)  # prunes a's tombstone

    response = await api.get(LIST, params={"watch": "1", "resourceVersion": str(old)}, headers=AUTH)
    body = await response.json()
    assert response.status == 410
    assert {k: body[k] for k in ("kind", "code", "reason")} == {
        "kind": "Status",
        "code": 410,
        "reason": "Expired",
    }
    assert "too old resource version" in body["message"]
    validate(body, LIST, "GET", 410)
    reader = await open_watch(api, resourceVersion=str(await list_version(api)))
    assert (await reader.next())["type"] == "BOOKMARK"


async def test_a_version_newer_than_the_store_is_410(api: Client) -> None:
    """A resourceVersion the store never reached (a restored backup): 410, list again."""
    await post_state(api, "lab", vm_state(1, {"a": {}}))
    response = await api.get(LIST, params={"watch": "1", "resourceVersion": "999"}, headers=AUTH)
    assert (response.status, (await response.json())["reason"]) == (410, "Expired")


async def test_tombstones_beyond_the_count_limit_are_pruned(
    api: Client, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most TOMBSTONES_MAX are kept; the horizon moves to the newest pruned version."""
    monkeypatch.setattr(watch_store, "TOMBSTONES_MAX", 2)
    await post_state(api, "lab", vm_state(1, {name: {} for name in "abc"}))
    uids = [await uid_of(api, name) for name in "abc"]
    await post_state(api, "lab", vm_state(2, {}))
    for uid in uids:
        await VMStatusWriter(db).finalize(uid)
    rows = await db.read("SELECT uid, resource_version FROM vm_tombstones ORDER BY resource_version")
    kept = {row[0] for row in rows if row[0]}
    assert kept == set(uids[1:])
    horizon = await watch_store.WatchStore(db).horizon()
    assert horizon == min(row[1] for row in rows if row[0]) - 1


async def test_a_label_selector_turns_matching_changes_into_added_and_deleted(api: Client) -> None:
    """With labelSelector, an object that starts matching is ADDED and one that stops is DELETED."""
    await post_state(api, "lab", vm_state(1, {"a": {"labels": {"tier": "web"}}, "b": {}}))
    reader = await open_watch(api, labelSelector="tier=web")
    assert summary(await reader.next()) == ("ADDED", "a")
    assert (await reader.next())["type"] == "BOOKMARK"
    await post_state(api, "lab", vm_state(2, {"a": {}, "b": {"labels": {"tier": "web"}}}))
    assert {summary(await next_checked(reader)) for _ in range(2)} == {("DELETED", "a"), ("ADDED", "b")}


async def test_a_project_scoped_watch_sees_only_that_project(api: Client) -> None:
    """/projects/{project}/qemuvms?watch=1 (and ?project=) skip every other project's changes."""
    await post_state(api, "lab", vm_state(1, {"a": {}}))
    for reader in (
        await open_watch(api, f"{APIS}/projects/lab/qemuvms"),
        await open_watch(api, project="lab"),
    ):
        assert summary(await reader.next()) == ("ADDED", "a")
        assert (await reader.next())["type"] == "BOOKMARK"
        await post_state(api, "other", vm_state(1, {"x": {}}))
        await post_state(api, "lab", vm_state(2, {"a": {}, "b": {}}))
        assert summary(await reader.next_change()) == ("ADDED", "b")


async def test_bookmarks_carry_the_current_version_as_heartbeats(serve: Serve) -> None:
    """With nothing to send, a BOOKMARK arrives every watch_bookmark_seconds with the newest
    version, also when the change it reflects was filtered out."""
    api = await serve(watch_bookmark_seconds=0.2)
    reader = await open_watch(api, project="lab")
    assert (await reader.next())["type"] == "BOOKMARK"
    await post_state(api, "other", vm_state(1, {"x": {}}))
    version = str(await list_version(api))
    async with asyncio.timeout(5):
        while (await reader.next())["object"]["metadata"]["resourceVersion"] != version:
            pass


async def test_a_watch_ends_after_timeout_seconds(api: Client) -> None:
    """timeoutSeconds=1 ends the stream cleanly after about a second."""
    reader = await open_watch(api, timeoutSeconds="1")
    started = time.monotonic()
    async with asyncio.timeout(5):
        await reader.response.content.read()
    assert 0.9 <= time.monotonic() - started < 4


async def test_writes_from_another_process_wake_the_watch(
    api: Client, tmp_path: Path, clock: FakeClock, database_url: str | None
) -> None:
    """A commit by another connection (as `tofu-qemu controller` makes) is seen through
    data_version polling (SQLite) or LISTEN/NOTIFY (PostgreSQL): no in-process notification."""
    reader = await open_watch(api)
    assert (await reader.next())["type"] == "BOOKMARK"
    other = await open_store(tmp_path / "data", database_url=database_url, clock=clock)
    try:
        await write(StateStore(other), vm_state(1, {"a": {}}), project="lab")
        assert summary(await reader.next_change(within=5)) == ("ADDED", "a")
    finally:
        await other.close()


async def test_watches_beyond_the_limit_get_429(serve: Serve) -> None:
    """max_watches watches are served; the next is a 429 Status with Retry-After; a slot frees
    when a watch ends."""
    api = await serve(max_watches=1)
    reader = await open_watch(api, timeoutSeconds="1")
    refused = await api.get(LIST, params={"watch": "true"}, headers=AUTH)
    body = await refused.json()
    assert (refused.status, body["code"], refused.headers["Retry-After"]) == (429, 429, "5")
    validate(body, LIST, "GET", 429)
    async with asyncio.timeout(5):
        await reader.response.content.read()
    # The slot is released just after the stream's last byte: retry briefly until it is.
    for _attempt in range(100):
        again = await api.get(LIST, params={"watch": "1", "timeoutSeconds": "1"}, headers=AUTH)
        if again.status != 429:
            break
        await asyncio.sleep(0.05)
    assert again.status == 200


async def test_shutdown_ends_open_watches_at_once(
    db: Database, clock: FakeClock, settings: ServerSettings
) -> None:
    """Stopping the server with watches open (their clients still connected) takes well under
    aiohttp's 60 s shutdown timeout, and each stream ends cleanly."""
    app = create_app(settings, credentials=CREDENTIALS, clock=clock, database=db)
    install_streams(app)
    server = TestServer(app)
    await server.start_server()
    async with aiohttp.ClientSession(headers=AUTH) as session:
        responses = [
            await session.get(server.make_url(LIST), params={"watch": "1", "allowWatchBookmarks": "1"})
            for _ in range(3)
        ]
        for response in responses:
            assert (await WatchReader(response).next())["type"] == "BOOKMARK"
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 5
        for response in responses:
            async with asyncio.timeout(5):
                assert await response.content.read() == b""
            assert response.content.at_eof()


async def test_changes_are_read_as_they_are_now_not_queued(api: Client, db: Database) -> None:
    """50 status writes after a watch's position come back as one change carrying the last
    status: what a slow watch is owed never grows with the number of writes."""
    await post_state(api, "lab", vm_state(1, {"a": {}}))
    position = await list_version(api)
    writer = VMStatusWriter(db)
    uid = await uid_of(api, "a")
    for restarts in range(50):
        await writer.write_status(uid, {"phase": "Running", "restarts": restarts})
    changes = await watch_store.WatchStore(db).changes(position)
    assert [(r.uid, (r.status or {})["restarts"]) for r in changes.live] == [(uid, 49)]
    assert changes.resource_version == position + 50


async def test_the_list_version_and_items_are_one_snapshot(api: Client, db: Database) -> None:
    """The list's resourceVersion is the newest of its items' (nothing newer slipped in)."""
    await post_state(api, "lab", vm_state(1, {name: {} for name in "abcdef"}))
    body = await (await api.get(LIST, headers=AUTH)).json()
    newest = max(int(item["metadata"]["resourceVersion"]) for item in body["items"])
    assert int(body["metadata"]["resourceVersion"]) == newest
