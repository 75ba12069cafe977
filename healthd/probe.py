"""The probe schedule: one loop per provider, each on its own jittered period.

A probe is the adapter's cheap health check (`GET /models` unless the provider asks for
a one-token chat), bounded by the interval so that a hung provider cannot hold its loop
past the next probe. Periods are jittered by ±10% and the first probe is spread over the
first tenth of a period, so that N providers (and a restarted daemon) do not hit their
upstreams, or our event loop, in lockstep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Final, Protocol

from opentelemetry.trace import StatusCode

from bulwark.providers.base import Adapter, ProbeResult
from bulwark.telemetry import Tracing

log = logging.getLogger("healthd.probe")

#: ±10%: enough to de-synchronise providers within a few periods, small enough that the
#: detection bound (two periods) barely moves.
JITTER: Final = 0.1


class ProbeHandler(Protocol):
    def before_probe(self, name: str) -> int | None:
        """Called as a probe starts; what it returns is handed back to `after_probe`."""
        ...

    async def after_probe(self, name: str, result: ProbeResult, token: int | None) -> None: ...


def jittered(interval: float, rng: random.Random) -> float:
    return interval * rng.uniform(1 - JITTER, 1 + JITTER)


class ProbeLoop:
    """Probes one provider forever; `kick()` makes the next probe start now."""

    def __init__(self, adapter: Adapter, *, interval: float, handler: ProbeHandler,
                 rng: random.Random | None = None, tracing: Tracing | None = None) -> None:
        self.adapter = adapter
        self._tracing = tracing
        self.name = adapter.provider.name
        self.interval = interval
        # Never longer than the period (the next probe is due), never longer than the
        # provider's own request budget (a probe is not worth more than a request).
        self.timeout = min(interval, adapter.provider.timeouts.total)
        self.chat = adapter.provider.health_check == "chat"
        self._handler = handler
        self._rng = rng or random.Random()
        self._kicked = asyncio.Event()
        self.probes = 0

    def kick(self) -> None:
        self._kicked.set()

    async def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kicked.wait(), seconds)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._pause(self._rng.uniform(0, JITTER * self.interval))
        while True:
            self._kicked.clear()
            started = loop.time()
            token = self._handler.before_probe(self.name)
            span = (self._tracing.probe_span(self.adapter.provider)
                    if self._tracing is not None else None)
            try:
                result = await self.adapter.probe(chat=self.chat, timeout=self.timeout)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # Adapters promise not to raise; one that does anyway has a bug, and a bug
                # in one adapter must not stop the probing of every provider.
                log.exception("probe raised", extra={"provider": self.name})
                result = ProbeResult(ok=False, latency_ms=(loop.time() - started) * 1000,
                                     error_class=f"probe_bug:{type(err).__name__}")
            self.probes += 1
            if span is not None:
                span.set_attribute("bulwark.probe.ok", result.ok)
                span.set_attribute("bulwark.probe.latency_s", result.latency_ms / 1000)
                if result.status is not None:
                    span.set_attribute("http.response.status_code", result.status)
                if not result.ok:
                    span.set_attribute("error.type", result.error_class or "unknown")
                    span.set_status(StatusCode.ERROR, result.error_class or "probe failed")
                span.end()
            await self._handler.after_probe(self.name, result, token)
            await self._pause(started + jittered(self.interval, self._rng) - loop.time())
