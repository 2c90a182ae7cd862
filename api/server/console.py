"""GET .../qemuvms/{name}/console: the tail of a VM's serial console log, optionally followed.

The log is QEMU's `-chardev file` for ttyS0, at DATA/run/<uid>/serial.log (the controller's
layout; the API may not import the controller, so the path is computed here). The path derives
only from the uid the store holds, checked to be a UUID, never from the request.

QEMU opens the file with O_TRUNC, so a restarted VM starts it again from nothing: a follow that
sees the file shrink, or replaced by another inode, reads it again from the start.

Bytes are served as they are (control characters included: it is a terminal's output), decoded
as UTF-8 with invalid sequences replaced, so the text/plain; charset=utf-8 body is honest.

With `?interactive=true` the request is a WebSocket to the serial port instead: console_ws.py.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from api.server import params
from api.server.auth import PRINCIPAL
from api.server.backend import project_of
from api.server.console_ws import interactive_console
from api.server.keys import SETTINGS, VMS
from api.server.streams import StreamHub, StreamKind, hub_of
from api.store import NotFound
from api.store.vms import VMRecord

log = structlog.get_logger(__name__)
TAIL_DEFAULT_BYTES = 64 * 1024
TAIL_MAX_BYTES = 1024 * 1024
FOLLOW_POLL_SECONDS = 0.5
FOLLOW_CHUNK_BYTES = 64 * 1024
FOLLOW_TIMEOUT_MAX = 24 * 3600  # the default is the follow_timeout_seconds setting
WRITE_TIMEOUT_SECONDS = 60.0
SERIAL_LOG = "serial.log"


class NoConsoleLog(Exception):
    """The VM has no serial log (it never started, or its runtime dir is gone)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    data: bytes
    # Where the next read starts, and which file it was (a restart replaces or truncates it).
    end: int
    inode: int


def serial_log_path(data_dir: Path, uid: str) -> Path:
    """DATA/run/<uid>/serial.log. :raise ValueError: `uid` is not a UUID (never a path)."""
    return data_dir / "run" / str(uuid.UUID(uid)) / SERIAL_LOG


def read_chunk(path: Path, *, start: int | None, tail: int, limit: int, inode: int | None) -> Chunk:
    """Read up to `limit` bytes from `start`, or the last `tail` bytes when `start` is None or
    the file is not the one (`inode`) or not as long as before: it was truncated or replaced.

    :raise NoConsoleLog: no such file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise NoConsoleLog(str(path)) from err
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if start is None or status.st_ino != inode or status.st_size < start:
            start = max(0, status.st_size - tail) if start is None else 0
        file.seek(start)
        data = file.read(min(limit, max(0, status.st_size - start)))
    return Chunk(data, start + len(data), status.st_ino)


async def console(request: web.Request) -> web.StreamResponse:
    if params.flag(request, "interactive"):
        return await interactive_console(request)
    project = project_of(request)
    tail = params.integer(request, "tailBytes", default=TAIL_DEFAULT_BYTES, minimum=0, maximum=TAIL_MAX_BYTES)
    follow = params.flag(request, "follow")
    timeout = params.integer(
        request,
        "timeoutSeconds",
        default=request.app[SETTINGS].follow_timeout_seconds,
        minimum=1,
        maximum=FOLLOW_TIMEOUT_MAX,
    )
    record = await request.app[VMS].get(project, request.match_info["name"])
    path = serial_log_path(request.app[SETTINGS].data_dir, record.uid)
    try:
        first = await asyncio.to_thread(read_chunk, path, start=None, tail=tail, limit=tail, inode=None)
    except NoConsoleLog as err:
        raise web.HTTPNotFound(
            text=f"VM {record.name!r} of project {project!r} has no console log yet (it has not started)"
        ) from err
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if not follow:
        return web.Response(
            text=decoder.decode(first.data, final=True), content_type="text/plain", charset="utf-8"
        )
    hub = hub_of(request.app)
    async with hub.slot(StreamKind.FOLLOW, request.get(PRINCIPAL)):
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/plain"
        response.charset = "utf-8"
        await response.prepare(request)
        try:
            await _write(request, response, decoder.decode(first.data).encode())
            await _follow(request, response, hub, record, first, decoder, timeout)
        except ConnectionError:
            return response
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response


async def _follow(
    request: web.Request,
    response: web.StreamResponse,
    hub: StreamHub,
    record: VMRecord,
    position: Chunk,
    decoder: codecs.IncrementalDecoder,
    limit_seconds: int,
) -> None:
    """Send what is appended until the client leaves, the log goes (the VM was removed), the
    server stops or `limit_seconds` pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_seconds
    path = serial_log_path(request.app[SETTINGS].data_dir, record.uid)
    started_at = _started_at(record)
    while True:
        changed = hub.changed()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FOLLOW_POLL_SECONDS):
                await changed.wait()  # a store commit, or close() at shutdown
        transport = request.transport
        if hub.closing or transport is None or transport.is_closing():
            return
        if loop.time() >= deadline:
            return
        if changed.is_set():
            # QEMU truncates the log in place when it starts again (same inode, and it may
            # already be longer than where we were): a new status.startedAt says so.
            try:
                current = await request.app[VMS].get(record.project, record.name)
            except NotFound:
                return
            if current.uid != record.uid:
                return
            if _started_at(current) != started_at:
                started_at = _started_at(current)
                position = Chunk(b"", 0, position.inode)
                log.info("console_log_restarted", uid=record.uid)
        while True:
            try:
                chunk = read_chunk(
                    path, start=position.end, tail=0, limit=FOLLOW_CHUNK_BYTES, inode=position.inode
                )
            except NoConsoleLog:
                log.info("console_log_gone", uid=record.uid)
                return
            position = chunk
            if not chunk.data:
                break
            await _write(request, response, decoder.decode(chunk.data).encode())


def _started_at(record: VMRecord) -> object:
    return (record.status or {}).get("startedAt")


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """:raise ConnectionError: the client left or stopped reading for WRITE_TIMEOUT_SECONDS."""
    if not data:
        return
    try:
        async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
            await response.write(data)
    except TimeoutError as err:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionAbortedError("the client stopped reading") from err
