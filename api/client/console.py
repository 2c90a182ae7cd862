"""`tofu-qemu console vm NAME`: the terminal attached to a VM's serial port, as `virsh console`.

The terminal goes into raw mode, so every key (Ctrl-C included) goes to the guest, except the
escape character Ctrl-] which detaches. The terminal's mode is restored on every way out: the
escape, the server ending the session, a lost connection, SIGTERM or SIGHUP, an error.

It talks to GET .../qemuvms/{name}/console?interactive=true, a WebSocket (docs/console.md):
binary frames both ways, and the server's JSON notices, which are printed on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import aiohttp

from api.client.connection import ClientError, Connection

ESCAPE = b"\x1d"  # Ctrl-]
ESCAPE_NAME = "^]"
READ_BYTES = 4096
CONNECT_TIMEOUT_SECONDS = 30.0
# Locate(connection, name, project) -> the VM's console path: found by the caller's rules.
Locate = Callable[[Connection, str, "str | None"], str]


def add_console_command(
    commands: Any, client_parser: Callable[..., argparse.ArgumentParser], locate: Locate
) -> None:
    parser = client_parser(
        commands, "console", f"attach this terminal to a VM's serial console ({ESCAPE_NAME} detaches)"
    )
    parser.add_argument("resource", choices=("vm", "vms", "qemuvm", "qemuvms", "qvm"), metavar="vm")
    parser.add_argument("name")
    parser.add_argument("--read-only", action="store_true", help="watch only: never take the input")
    parser.set_defaults(client=lambda connection, args, out, now: _console(connection, args, locate))


def _console(connection: Connection, args: argparse.Namespace, locate: Locate) -> None:
    path = locate(connection, args.name, args.project)
    reason = asyncio.run(_session(connection, path, args.read_only, name=args.name))
    _say(f"\nDisconnected from VM {args.name}: {reason}")


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode for the body when `fd` is a terminal; its mode as before afterwards, whatever
    happens (the finally runs for exceptions, and SIGTERM/SIGHUP are turned into a detach)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        with contextlib.suppress(termios.error):  # the terminal itself went away (SIGHUP)
            termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _say(text: str, stream: TextIO = sys.stderr) -> None:
    stream.write(text.replace("\n", "\r\n") + "\r\n")
    stream.flush()


async def _session(connection: Connection, path: str, read_only: bool, *, name: str) -> str:
    """Attach, then run the session in raw mode until the escape, the server's end or a signal.
    A refused attach leaves the terminal untouched. :return: why it ended."""
    url = connection.server.rstrip("/") + path
    headers = {"Authorization": connection.authorization} if connection.authorization else {}
    params = {"interactive": "true", **({"readOnly": "true"} if read_only else {})}
    timeout = aiohttp.ClientWSTimeout(ws_close=5.0)
    async with aiohttp.ClientSession(trust_env=True) as http:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                socket = await http.ws_connect(
                    url, params=params, headers=headers, ssl=connection.ssl_context or True, timeout=timeout
                )
        except aiohttp.WSServerHandshakeError as err:
            raise ClientError(f"{err.status} {_refusal(err.status)}: the console of {path} refused") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise ClientError(f"cannot reach {connection.server}: {err or type(err).__name__}") from None
        async with socket:
            stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
            _say(f"Connected to VM {name} (escape character is {ESCAPE_NAME})")
            with raw_terminal(stdin):
                return await _pump(socket, stdin, stdout)


def _refusal(status: int) -> str:
    return {
        401: "not authenticated (TOFU_QEMU_USERNAME/PASSWORD or TOKEN)",
        403: "forbidden",
        404: "no such VM",
        409: "the VM is not running here",
        429: "too many console sessions open",
        503: "the server is shutting down",
    }.get(status, "refused")


async def _pump(socket: aiohttp.ClientWebSocketResponse, stdin: int, stdout: int) -> str:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()

    def finish(reason: str) -> None:
        if not done.done():
            done.set_result(reason)

    def on_key() -> None:
        try:
            data = os.read(stdin, READ_BYTES)
        except OSError as err:
            finish(f"the terminal failed: {err}")
            return
        if not data:
            finish("end of input")
            return
        before, escape, _ = data.partition(ESCAPE)
        if before:
            keys.put_nowait(before)
        if escape:
            finish(f"detached ({ESCAPE_NAME})")

    keys: asyncio.Queue[bytes] = asyncio.Queue()
    loop.add_reader(stdin, on_key)
    for number in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(number, finish, f"signal {signal.Signals(number).name}")
    tasks = [
        loop.create_task(_print_output(socket, stdout, finish)),
        loop.create_task(_send_keys(socket, keys, finish)),
    ]
    try:
        return await done
    finally:
        loop.remove_reader(stdin)
        for number in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(number)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _send_keys(
    socket: aiohttp.ClientWebSocketResponse, keys: asyncio.Queue[bytes], finish: Callable[[str], None]
) -> None:
    """Keys in the order typed (the terminal hands them over faster than the guest reads them)."""
    while True:
        data = await keys.get()
        try:
            await socket.send_bytes(data)
        except (ConnectionError, aiohttp.ClientError) as err:
            finish(f"the connection failed: {err}")
            return


async def _print_output(
    socket: aiohttp.ClientWebSocketResponse, stdout: int, finish: Callable[[str], None]
) -> None:
    reason = "the server closed the session"
    async for message in socket:
        if message.type is aiohttp.WSMsgType.BINARY:
            _write_all(stdout, message.data)
        elif message.type is aiohttp.WSMsgType.TEXT:
            notice = _notice(message.data)
            if notice.get("type") == "detached":
                reason = str(notice.get("reason"))
            elif notice.get("message"):
                _say(f"[{notice['message']}]")
        elif message.type is aiohttp.WSMsgType.ERROR:
            reason = f"the connection failed: {socket.exception()}"
    finish(reason)


def _notice(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
