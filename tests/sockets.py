"""Socket helpers shared by the component and e2e tests of the server's connection limits."""

from __future__ import annotations

import asyncio


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes this connection within `seconds` (whatever it sent first)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True
