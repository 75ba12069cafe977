"""Glue between this process's breakers and the shared state on the bus.

- A row from Postgres (another process tripped a breaker, healthd moved it to half-open or
  closed it) is applied to the local breaker as a remote transition.
- A local transition (this process's own traffic tripped a breaker) is queued for
  publishing; one owned task writes it, so the request path never awaits Postgres.
- While healthd is fresh, breakers follow the shared state only (healthd's probes test an
  open provider); when it goes stale, they fall back to passive recovery on their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Protocol

import msgspec

from bulwark import forced
from bulwark.breaker import State, Transition
from bulwark.bus import Bus, FallbackEvent, ServiceError
from bulwark.errors import UpstreamError
from bulwark.state import FleetRow, StateRow
from service.router import Router

log = logging.getLogger("bulwark.sync")

#: Check healthd's freshness this often; switching modes a fraction of a second late is
#: harmless, and the check costs nothing measurable.
FRESHNESS_CHECK_SEC = 0.25


class Publisher(Protocol):
    async def publish(self, provider: str, *, breaker: str | None = None,
                      health: str | None = None, reason: str, source: str,
                      open_for: float | None = None) -> StateRow | None: ...


def process_name() -> str:
    return f"web:{socket.gethostname()}:{os.getpid()}"


class StateSync:
    def __init__(self) -> None:
        self.router: Router | None = None
        self.name = process_name()
        self._outbox: asyncio.Queue[Transition] = asyncio.Queue(maxsize=10_000)
        self.dropped = 0

    def attach(self, router: Router) -> None:
        self.router = router

    def on_transition(self, t: Transition) -> None:
        """Breaker callback (sync, request path): log, and queue local changes to share."""
        log.info("breaker transition", extra={
            "provider": t.name, "transition": f"{t.from_state}->{t.to_state}",
            "reason": t.reason, "source": t.source})
        if t.source == "remote":
            return
        try:
            self._outbox.put_nowait(t)
        except asyncio.QueueFull:
            self.dropped += 1

    def on_row(self, row: StateRow) -> None:
        """View subscriber: adopt the shared breaker state."""
        rt = self.router.runtimes.get(row.provider) if self.router else None
        if rt is None:
            return
        try:
            state = State(row.breaker)
        except ValueError:
            log.warning("unknown breaker state in shared row", extra={"provider": row.provider})
            return
        rt.breaker.apply_remote(state, row.reason or "shared state", open_for=row.open_for)

    def on_fleet(self, row: FleetRow) -> None:
        """View subscriber: an operator's force-open (or its removal) for a provider."""
        name = forced.provider_of(row.key)
        rt = self.router.runtimes.get(name) if self.router and name else None
        if rt is not None:
            rt.forced_until = forced.deadline(row.value)

    def follow_freshness(self) -> None:
        if self.router is None:
            return
        passive = not self.router.shared_health_trusted()
        for rt in self.router.runtimes.values():
            if rt.breaker.config.auto_half_open is not passive:
                rt.breaker.config = msgspec.structs.replace(rt.breaker.config,
                                                            auto_half_open=passive)

    async def run(self, publisher: Publisher | None) -> None:
        """Owned task: publish queued transitions; keep the breaker mode in step."""
        while True:
            try:
                t = await asyncio.wait_for(self._outbox.get(), FRESHNESS_CHECK_SEC)
            except TimeoutError:
                self.follow_freshness()
                continue
            self.follow_freshness()
            if publisher is None:
                continue
            await publisher.publish(t.name, breaker=str(t.to_state), reason=t.reason,
                                    source=self.name, open_for=t.open_for)


async def run_sync(sync: StateSync, publisher: Publisher | None) -> AsyncIterator[None]:
    task = asyncio.create_task(sync.run(publisher), name="state-sync")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class ErrorRecorder:
    """Classified upstream failures, batched into `service_errors` rows off the request
    path. The detail was sanitised by the adapter (no keys, no bodies beyond a redacted
    snippet). Bounded: under a storm of failures the oldest unsent rows are dropped and
    counted, rather than memory growing while Postgres is slow or down."""

    #: One flush a second keeps rows near real time at a handful of INSERTs per second.
    FLUSH_SEC = 1.0
    MAX_PENDING = 5_000

    def __init__(self) -> None:
        self._pending: list[ServiceError] = []
        self._fallbacks: list[FallbackEvent] = []
        self.dropped = 0

    def fallback_used(self, kind: str, model: str, provider: str) -> None:
        """An answer that was not the first choice's, for the reliability report."""
        if len(self._fallbacks) >= self.MAX_PENDING:
            self._fallbacks.pop(0)
            self.dropped += 1
        self._fallbacks.append(FallbackEvent(kind=kind, model=model, provider=provider,
                                             at=datetime.now(UTC)))

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            self._pending.pop(0)
            self.dropped += 1
        self._pending.append(ServiceError(
            error_class=str(err.cls), provider=provider, request_id=request_id, model=model,
            status=err.status, detail=err.detail, at=datetime.now(UTC)))

    async def run(self, bus: Bus) -> None:
        while True:
            await asyncio.sleep(self.FLUSH_SEC)
            await self.flush(bus)

    async def flush(self, bus: Bus) -> None:
        batch, self._pending = self._pending, []
        if batch and not await bus.record_errors(batch):
            self.dropped += len(batch)
        used, self._fallbacks = self._fallbacks, []
        if used and not await bus.record_fallbacks(used):
            self.dropped += len(used)
