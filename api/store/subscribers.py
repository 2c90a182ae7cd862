"""Who hears this process's commits (`Database.subscribe`), kept once for both engines."""

from __future__ import annotations

from collections.abc import Callable


class Subscribers:
    def __init__(self) -> None:
        self._callbacks: list[tuple[Callable[[], None], bool]] = []

    def add(self, callback: Callable[[], None], *, volatile: bool) -> None:
        self._callbacks.append((callback, volatile))

    def committed(self, *, durable: bool) -> None:
        """Call every subscriber after a commit that notifies; those that asked for durable
        commits only are skipped after a `durable=False` one (status, events)."""
        for callback, volatile in self._callbacks:
            if durable or volatile:
                callback()
