"""`?watch=true` on the QemuVM lists: a stream of newline-delimited JSON watch events.

Semantics (docs/api.md "Watch"), following Kubernetes:
- BOOKMARK events only with `allowWatchBookmarks=true`, as in Kubernetes (kubectl get -w does
  not ask for them and would print one as an object).
- Without `resourceVersion` (or with 0): an ADDED event for every current object, then a
  BOOKMARK annotated `k8s.io/initial-events-end`, then changes.
- With `resourceVersion=N`: every change after N, then that BOOKMARK, then changes. A live
  object that changed after N comes as MODIFIED (the store keeps no creation resourceVersion,
  so after a gap an update cannot be told from a creation; informers treat both as upserts);
  an object removed after N comes as DELETED, from its tombstone. N older than the tombstone
  horizon, or newer than the store, is 410 Expired before the stream starts (an ERROR event
  with the same Status if the horizon passes the stream later).
- Once streaming, an object the stream has not shown is ADDED, one it has shown is MODIFIED,
  and a removed one is DELETED. With a labelSelector an object that stops matching is DELETED
  and one that starts matching is ADDED, as in Kubernetes.
- Changes are read from the store as they are now, not replayed: several changes of one object
  between two reads arrive as one event, so a slow reader never makes the server buffer more
  than one batch.
- `fieldSelector` (metadata.name, metadata.namespace) filters like `labelSelector`; a `render`
  (kubectl's one-row Table per event) shapes each object on the wire.
- A BOOKMARK with the current resourceVersion every `watch_bookmark_seconds` (a setting, 15 by
  default) keeps proxies from timing the connection out and tells the client where to resume.
- The stream ends after `timeoutSeconds` (default WATCH_TIMEOUT_DEFAULT), when the client
  goes away or stops reading for WRITE_TIMEOUT_SECONDS, or at server shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from api.k8s_types import INITIAL_EVENTS_END, WatchEventType
from api.kube import FieldSelector
from api.labels import Selector
from api.server.auth import PRINCIPAL
from api.server.keys import DATABASE, SETTINGS
from api.server.streams import StreamHub, StreamKind, hub_of
from api.store.vms import VMRecord
from api.store.watch import Changes, Expired, WatchStore
from api.types import API_VERSION, KIND

log = structlog.get_logger(__name__)
EVERY_FIELD = FieldSelector()
CONTENT_TYPE = "application/json;stream=watch"
WATCH_TIMEOUT_DEFAULT = 1800
WATCH_TIMEOUT_MAX = 3600
WRITE_TIMEOUT_SECONDS = 60.0
# Lines are written in chunks of about this size: one write per event would be slow for a
# 10,000-object initial list, one write for everything would hold it all in memory.
WRITE_CHUNK_BYTES = 64 * 1024
# How often a waiting stream checks for a departed client, timeouts and heartbeats.
TICK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class WatchRequest:
    project: str | None
    selector: Selector
    # None: list first (synthetic ADDED); else resume after it.
    since: int | None
    timeout_seconds: int
    fields: FieldSelector = EVERY_FIELD
    # BOOKMARK events only for clients that asked (allowWatchBookmarks), as in Kubernetes:
    # kubectl get -w would print one as an object.
    bookmarks: bool = True
    # How an object goes on the wire (kubectl asks for a one-row Table per event).
    render: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def matches(self, project: str, name: str, labels: Mapping[str, str]) -> bool:
        fields = {"metadata.name": name, "metadata.namespace": project}
        return self.selector.matches(labels) and self.fields.matches(fields)


class _ClientGone(Exception):
    """The client disconnected or stopped reading."""


@dataclass(slots=True)
class _Stream:
    """One watch's position and what its client has been shown."""

    response: web.StreamResponse
    request: web.Request
    position: int
    watch: WatchRequest
    shown: set[str] = field(default_factory=set)
    buffer: bytearray = field(default_factory=bytearray)

    async def send_object(self, type_: WatchEventType, obj: dict[str, Any]) -> None:
        render = self.watch.render
        await self.send(type_, render(obj) if render is not None else obj)

    async def send(self, type_: WatchEventType, obj: dict[str, Any]) -> None:
        self.buffer += json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"
        if len(self.buffer) >= WRITE_CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self.buffer:
            return
        data, self.buffer = bytes(self.buffer), bytearray()
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                await self.response.write(data)
        except TimeoutError as err:
            # It stopped reading: drop the connection and what is queued for it.
            if self.request.transport is not None:
                self.request.transport.abort()
            raise _ClientGone("stopped reading") from err
        except ConnectionError as err:
            raise _ClientGone("disconnected") from err

    async def bookmark(self, *, initial_end: bool = False) -> None:
        if not self.watch.bookmarks:
            await self.flush()
            return
        metadata: dict[str, Any] = {"resourceVersion": str(self.position)}
        if initial_end:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        await self.send("BOOKMARK", {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata})
        await self.flush()

    @property
    def client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()


def expired_status(message: str) -> dict[str, Any]:
    """Kubernetes' answer to a resourceVersion it no longer has: clients re-list on it."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": 410,
        "reason": "Expired",
        "message": message,
    }


async def serve_watch(request: web.Request, watch: WatchRequest) -> web.StreamResponse:
    """Answer a watch. Errors found before the stream starts (410, 429, 503) are plain answers."""
    hub = hub_of(request.app)
    store = WatchStore(request.app[DATABASE])
    async with hub.slot(StreamKind.WATCH, request.get(PRINCIPAL)):
        wake = hub.changed()
        if watch.since is None:
            snapshot = await store.snapshot(project=watch.project)
            first: Changes = Changes(snapshot.resource_version, snapshot.records, [])
            shown: set[str] = set()
        else:
            # What the client holds, as far as the server can tell: every matching object that
            # is live now (read first, so that `first` covers whatever is created after it).
            current = await store.snapshot(project=watch.project)
            shown = {r.uid for r in current.records if watch.matches(r.project, r.name, r.labels)}
            try:
                first = await store.changes(watch.since, project=watch.project)
            except Expired as err:
                return web.json_response(expired_status(str(err)), status=410)
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        stream = _Stream(response, request, first.resource_version, watch, shown)
        log.info("watch_started", project=watch.project, since=watch.since, position=stream.position)
        try:
            await _emit(stream, first, resumed=watch.since is not None)
            await stream.bookmark(initial_end=True)
            await _follow(stream, hub, store, watch, wake)
        except _ClientGone as err:
            log.info("watch_client_gone", reason=str(err), position=stream.position)
            return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response


async def _follow(
    stream: _Stream, hub: StreamHub, store: WatchStore, watch: WatchRequest, wake: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + watch.timeout_seconds
    heartbeat = stream.request.app[SETTINGS].watch_bookmark_seconds
    next_heartbeat = loop.time() + heartbeat
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(TICK_SECONDS, max(0.0, next_heartbeat - loop.time()))):
                await wake.wait()
        if hub.closing or loop.time() >= deadline or stream.client_gone:
            return
        if wake.is_set():
            wake = hub.changed()
            try:
                changes = await store.changes(stream.position, project=watch.project)
            except Expired as err:
                await stream.send("ERROR", expired_status(str(err)))
                await stream.flush()
                return
            await _emit(stream, changes, resumed=False)
            await stream.flush()
        if loop.time() >= next_heartbeat:
            await stream.bookmark()
            next_heartbeat = loop.time() + heartbeat


async def _emit(stream: _Stream, changes: Changes, *, resumed: bool) -> None:
    """Send `changes` in resourceVersion order and move the stream's position past them."""
    events: list[tuple[int, WatchEventType, str, dict[str, Any]]] = []
    watch = stream.watch
    for record in changes.live:
        matches = watch.matches(record.project, record.name, record.labels)
        kind = _live_event(stream.shown, record.uid, matches, resumed=resumed)
        if kind is not None:
            events.append((record.resource_version, kind, record.uid, _render(record)))
    for tombstone in changes.removed:
        labels = tombstone.object.get("metadata", {}).get("labels", {})
        matches = watch.matches(tombstone.project, tombstone.name, labels)
        if tombstone.uid in stream.shown or (resumed and matches):
            events.append((tombstone.resource_version, "DELETED", tombstone.uid, tombstone.object))
    events.sort(key=lambda event: event[0])
    for _version, kind, uid, obj in events:
        if kind == "DELETED":
            stream.shown.discard(uid)
        else:
            stream.shown.add(uid)
        await stream.send_object(kind, obj)
    stream.position = changes.resource_version


def _live_event(shown: set[str], uid: str, matches: bool, *, resumed: bool) -> WatchEventType | None:
    if not matches:
        # It stopped matching: to this client it is gone.
        return "DELETED" if uid in shown else None
    if resumed or uid in shown:
        return "MODIFIED"
    return "ADDED"


def _render(record: VMRecord) -> dict[str, Any]:
    rendered: dict[str, Any] = record.to_object().model_dump(mode="json", by_alias=True)
    return rendered
