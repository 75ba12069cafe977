"""The streams a web process has open, so that shutdown can end each one with an error
event instead of letting the connection be cut (a cut reads as a complete answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Protocol

from bulwark.errors import GatewayError


class Abandonable(Protocol):
    async def abandon(self, err: GatewayError) -> None: ...


class OpenStreams:
    def __init__(self) -> None:
        self._open: set[Abandonable] = set()
        self._closer: asyncio.Task[None] | None = None

    def add(self, stream: Abandonable) -> None:
        self._open.add(stream)

    def discard(self, stream: Abandonable) -> None:
        self._open.discard(stream)

    def __iter__(self) -> Iterator[Abandonable]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    async def abandon_all(self, err: GatewayError) -> None:
        for stream in self:
            await stream.abandon(err)

    def abandon_all_later(self, delay: float, err: GatewayError) -> None:
        """Schedule abandon_all() without waiting for it (aiohttp's drain wait starts only
        once the on_shutdown handlers have returned)."""

        async def later() -> None:
            await asyncio.sleep(delay)
            await self.abandon_all(err)

        self._closer = asyncio.create_task(later(), name="end-streams")

    async def close(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
            await asyncio.gather(self._closer, return_exceptions=True)
