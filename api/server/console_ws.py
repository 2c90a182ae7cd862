"""GET .../qemuvms/{name}/console?interactive=true: a WebSocket attached to the VM's serial port.

Frames: binary frames from the server are what the guest wrote; binary or text frames from the
client are keystrokes (at most INPUT_FRAME_MAX_BYTES each). The server's text frames are JSON
notices: first `{"type": "attached", "role": "writer"|"reader", ...}`, and before it closes,
`{"type": "detached", "reason": ...}`. Several sessions may read; one writes (the first that
asks; `?readOnly=true` never asks). A session that asks while another writes is attached
read-only and told so: its keystrokes are dropped, with one notice.

Auth as every route (the middleware ran before this handler). A WebSocket is a GET, which the
same-origin middleware lets through, yet a page of another site may open one with the user's
credentials: the handshake's Origin must be this server's. Every attach and detach is an event
of the VM (ConsoleAttached, ConsoleDetached) naming the principal.

Limits: max_consoles and max_consoles_per_principal (429), console_idle_seconds without a
keystroke ends the writer's session, QEMU taking no input for 10 s ends it too, and a session
that cannot keep up with the guest's output is detached (api/server/serial_line.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import weakref

import structlog
from aiohttp import WSMsgType, web

from api.server import params
from api.server.auth import principal_of
from api.server.backend import project_of
from api.server.errors import status_response
from api.server.events import event_log_of
from api.server.keys import SETTINGS, VMS
from api.server.origin import cross_site_problem
from api.server.serial_line import (
    Attachment,
    ConsoleHub,
    ConsolesClosing,
    NoSerialSocket,
    SerialLine,
    TooManyConsoles,
)
from api.settings import ServerSettings
from api.store.events import NewEvent
from api.store.sql import FAILURES
from api.store.vms import VMRecord

log = structlog.get_logger(__name__)
INPUT_FRAME_MAX_BYTES = 4096
HEARTBEAT_SECONDS = 30.0
SEND_TIMEOUT_SECONDS = 30.0
RETRY_AFTER_SECONDS = 5
# Close codes of the application range (4000-4999): why the server ended the session.
CLOSE_DETACHED = 4000
CLOSE_IDLE = 4001
_HUBS: weakref.WeakKeyDictionary[web.Application, ConsoleHub] = weakref.WeakKeyDictionary()


def console_hub_of(app: web.Application) -> ConsoleHub:
    """The app's hub, made on first use (app state cannot be set once the app runs)."""
    hub = _HUBS.get(app)
    if hub is None:
        settings: ServerSettings = app[SETTINGS]
        hub = _HUBS[app] = ConsoleHub(
            settings.data_dir, total=settings.max_consoles, per_principal=settings.max_consoles_per_principal
        )
    return hub


def install_consoles(app: web.Application) -> None:
    """End the open sessions at shutdown, so that aiohttp does not wait its timeout for them."""

    async def close_consoles(app: web.Application) -> None:
        hub = _HUBS.get(app)
        if hub is not None:
            await hub.close()

    app.on_shutdown.append(close_consoles)


async def interactive_console(request: web.Request) -> web.StreamResponse:
    problem = cross_site_problem(
        request.host, request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site")
    )
    if problem is not None:
        return status_response(403, problem)
    want_write = not params.flag(request, "readOnly")
    record = await request.app[VMS].get(project_of(request), request.match_info["name"])
    # aiohttp refuses a frame of max_msg_size bytes or more; no compression: keystrokes are
    # small, and nothing to inflate means no decompression bomb.
    socket = web.WebSocketResponse(
        heartbeat=HEARTBEAT_SECONDS, max_msg_size=INPUT_FRAME_MAX_BYTES + 1, compress=False
    )
    if not socket.can_prepare(request).ok:
        return status_response(400, "interactive=true needs a WebSocket upgrade (Connection: Upgrade)")
    principal = principal_of(request)
    try:
        async with console_hub_of(request.app).session(record.uid, principal, want_write=want_write) as (
            line,
            attachment,
        ):
            await socket.prepare(request)
            message = await _attached(request, record, attachment, want_write)
            role = "writer" if attachment.writer else "reader"
            await _notice(socket, {"type": "attached", "role": role, "message": message})
            started = time.monotonic()
            try:
                await _run(request, socket, line, attachment)
            finally:
                seconds = time.monotonic() - started
                await _detached(request, socket, record, attachment, seconds)
    except TooManyConsoles as err:
        return status_response(429, str(err), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    except ConsolesClosing as err:
        return status_response(503, str(err))
    except NoSerialSocket as err:
        log.info("console_no_socket", uid=record.uid, error=str(err))
        return status_response(409, _no_socket_message(record))
    return socket


def _no_socket_message(record: VMRecord) -> str:
    host = (record.status or {}).get("host")
    where = f" on host {host!r}" if host else ""
    return (
        f"VM {record.name!r} has no serial port to attach to here: it is not running{where}, or it "
        "runs on a host whose runtime dir this API process cannot reach (an API on that host "
        "serves its console)"
    )


async def _run(
    request: web.Request, socket: web.WebSocketResponse, line: SerialLine, attachment: Attachment
) -> None:
    """Pump output to the client and input to the guest until either side ends."""
    idle = float(request.app[SETTINGS].console_idle_seconds)
    try:
        async with asyncio.TaskGroup() as tasks:
            output = tasks.create_task(_send_output(socket, attachment))
            await _receive_input(socket, line, attachment, idle)
            attachment.end(attachment.ended or "the client left")
            output.cancel()
    except* ConnectionError as group:
        attachment.end(f"the connection failed: {group.exceptions[0]}")


async def _send_output(socket: web.WebSocketResponse, attachment: Attachment) -> None:
    while (data := await attachment.queue.get()) is not None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                await socket.send_bytes(data)
        except TimeoutError as err:
            attachment.end(f"the client read nothing for {SEND_TIMEOUT_SECONDS:.0f} s")
            raise ConnectionAbortedError("the client stopped reading") from err
    # The line ended this session (the VM stopped, too slow, shutdown): say why, then close.
    reason = attachment.ended or "detached"
    if not socket.closed:
        await _notice(socket, {"type": "detached", "reason": reason})
        await socket.close(code=CLOSE_DETACHED, message=reason[:120].encode())


async def _receive_input(
    socket: web.WebSocketResponse, line: SerialLine, attachment: Attachment, idle: float
) -> None:
    told_read_only = False
    while attachment.ended is None:
        try:
            message = await socket.receive(timeout=idle if attachment.writer else None)
        except TimeoutError:
            attachment.end(f"idle: no input for {idle:.0f} s")
            return
        if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return
        data = message.data.encode() if message.type is WSMsgType.TEXT else message.data
        if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY) or not data:
            continue
        if not attachment.writer:
            if not told_read_only:
                await _notice(
                    socket, {"type": "readOnly", "message": "this session is read-only: input dropped"}
                )
                told_read_only = True
            continue
        await line.send(attachment, data)


async def _notice(socket: web.WebSocketResponse, notice: dict[str, str]) -> None:
    """Best effort: a client that already left needs no notice."""
    if not socket.closed:
        with contextlib.suppress(ConnectionError):
            await socket.send_str(json.dumps(notice))


async def _attached(request: web.Request, record: VMRecord, attachment: Attachment, want_write: bool) -> str:
    role = "writer" if attachment.writer else "reader"
    why = "" if attachment.writer or not want_write else ": another session holds the input"
    message = f"{attachment.principal} attached to the serial console as {role}{why}"
    await _record(request, record, "ConsoleAttached", message)
    log.info("console_attached", uid=record.uid, principal=attachment.principal, role=role)
    return message


async def _detached(
    request: web.Request,
    socket: web.WebSocketResponse,
    record: VMRecord,
    attachment: Attachment,
    seconds: float,
) -> None:
    reason = attachment.ended or "the client left"
    await _record(
        request,
        record,
        "ConsoleDetached",
        f"{attachment.principal} detached from the serial console after {seconds:.0f} s: {reason}",
    )
    log.info("console_detached", uid=record.uid, principal=attachment.principal, reason=reason)
    if not socket.closed:
        code = CLOSE_IDLE if reason.startswith("idle") else CLOSE_DETACHED
        await _notice(socket, {"type": "detached", "reason": reason})
        await socket.close(code=code, message=reason[:120].encode())


async def _record(request: web.Request, record: VMRecord, reason: str, message: str) -> None:
    """A lost event is logged, never raised: the console works without its record."""
    try:
        await event_log_of(request.app).record(
            NewEvent(record.uid, record.project, record.name, reason, message)
        )
    except FAILURES as err:
        log.warning("event_record_failed", uid=record.uid, reason=reason, error=str(err))
