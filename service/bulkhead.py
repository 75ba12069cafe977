"""Bulkheads: a cap on work in flight, with a short bounded wait for a free slot.

One per web process on client requests (`BULWARK_MAX_IN_FLIGHT`), one per provider on
upstream requests (`max_in_flight` in the providers file). A flood beyond the cap is
refused quickly (503 with Retry-After) instead of piling up memory and latency for
everyone, and a full provider is failed over like one that is rate limited. Waiters are
served first come, first served; a slot freed while someone waits is handed to them
directly, so that a newcomer cannot overtake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from bulwark.errors import ServiceUnavailable


class Bulkhead:
    __slots__ = ("_waiters", "cap", "in_flight", "refused", "wait_sec")

    def __init__(self, cap: int, *, wait_sec: float) -> None:
        self.cap = cap
        self.wait_sec = wait_sec
        self.in_flight = 0
        self.refused = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_enter(self) -> bool:
        if self.in_flight < self.cap:
            self.in_flight += 1
            return True
        return False

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait (at most `timeout`, default wait_sec) for a slot; True when one is ours."""
        if self.try_enter():
            return True
        limit = self.wait_sec if timeout is None else timeout
        if limit <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(limit):
                await fut
        except TimeoutError:
            # A slot handed over in the same instant as the timeout is ours all the same.
            return fut.done() and not fut.cancelled()
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave()  # handed a slot just as we were cancelled: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(fut)
        return True

    async def enter(self) -> None:
        """Take a slot, or raise 503 `server_overloaded` after the bounded wait."""
        if self.in_flight < self.cap:
            self.in_flight += 1
            return
        if not await self.wait():
            self.refused += 1
            raise ServiceUnavailable(
                "This gateway process is at its limit of requests in flight; retry after "
                "the delay given.", code="server_overloaded", retry_after=1.0)

    def leave(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the waiter: in_flight unchanged
                return
        self.in_flight -= 1
