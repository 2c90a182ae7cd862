"""stall_tolerant_timeout (controller/loop_stalls.py): a reply that came while the event loop
did not run is a reply, not a timeout; silence on a running loop is still given up, and a loop
that keeps stalling extends a timeout a bounded number of times."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from controller.loop_stalls import MAX_EXTENSIONS, STALL_SECONDS, stall_tolerant_timeout

SECONDS = 0.2


@pytest.fixture
async def line() -> AsyncIterator[tuple[asyncio.StreamReader, socket.socket]]:
    """A stream the test reads, and the socket whose sends it reads (the other side)."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    yield reader, theirs
    writer.close()
    theirs.close()


async def ask(reader: asyncio.StreamReader, *, tolerant: bool) -> bytes:
    timeout = stall_tolerant_timeout(SECONDS) if tolerant else asyncio.timeout(SECONDS)
    async with timeout:
        return await reader.readline()


@pytest.mark.parametrize("tolerant", [False, True])
async def test_a_reply_that_came_while_the_loop_was_frozen(
    line: tuple[asyncio.StreamReader, socket.socket], tolerant: bool
) -> None:
    """The loop frozen past the deadline (SIGSTOP, starvation), the reply sent meanwhile: plain
    asyncio.timeout serves its expired timer first and calls it a timeout (the bug);
    stall_tolerant_timeout returns the reply."""
    reader, theirs = line
    asking = asyncio.create_task(ask(reader, tolerant=tolerant))
    await asyncio.sleep(0.01)  # the question is asked; the loop waits for the reply
    theirs.sendall(b"answer\n")
    time.sleep(SECONDS * 3)  # noqa: ASYNC251 - the loop frozen on purpose
    if tolerant:
        assert await asking == b"answer\n"
    else:
        with pytest.raises(TimeoutError):
            await asking


async def test_silence_on_a_running_loop_is_given_up_on_time(
    line: tuple[asyncio.StreamReader, socket.socket],
) -> None:
    reader, _ = line
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await ask(reader, tolerant=True)
    took = time.monotonic() - started
    assert SECONDS <= took < SECONDS + STALL_SECONDS, took


async def test_a_loop_that_keeps_stalling_extends_the_timeout_a_bounded_number_of_times(
    line: tuple[asyncio.StreamReader, socket.socket],
) -> None:
    """Silence while the loop stalls at every deadline: given up after MAX_EXTENSIONS more."""
    reader, _ = line
    loop = asyncio.get_running_loop()
    stalls = 0
    asking = True

    def stall() -> None:
        nonlocal stalls
        if asking:
            stalls += 1
            time.sleep(SECONDS + STALL_SECONDS)  # a starved loop, on purpose
            loop.call_later(SECONDS / 2, stall)

    loop.call_later(SECONDS / 2, stall)
    try:
        with pytest.raises(TimeoutError):
            await ask(reader, tolerant=True)
    finally:
        asking = False
    # One stall per deadline, each extending it, until the extensions run out.
    assert MAX_EXTENSIONS <= stalls <= MAX_EXTENSIONS + 2, stalls


def test_the_documented_numbers() -> None:
    """docs/multi-host.md, "Freezes and starvation": 0.25 s late is a stall, at most 3 extensions."""
    assert (STALL_SECONDS, MAX_EXTENSIONS) == (0.25, 3)
