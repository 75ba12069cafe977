"""The web process's telemetry glue: what the dispatcher, the breakers and the bus tell
metrics and traces.

- `WebObserver` is the dispatcher's `Observer`: per attempt it hands back the metrics
  children bound once for (provider, model) — or, when the request is traced, an attempt
  with its CLIENT span — and forwards failures to the `service_errors` recorder.
- `breaker_hook` wraps a breaker's transition callback: a counter, the state gauge, and a
  span event when the transition happens inside a traced request.
- `sample_ctx` is a cleanup context whose task copies, once a second, what is cheaper to
  read than to push: breaker states, providers available per model, the fleet's
  degradation level, healthd's heartbeat age, and the bus's counters and heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Final

from aiohttp import web

from bulwark import metrics
from bulwark.breaker import State, Transition
from bulwark.bus import Bus
from bulwark.degradation import effective
from bulwark.errors import ServiceUnavailable, UpstreamError
from bulwark.metrics import AttemptMetrics
from bulwark.state import Health, View
from bulwark.telemetry import Tracing
from bulwark.telemetry import setup as setup_tracing
from service import keys
from service.dispatch import Attempt, EmbedRequest, Request
from service.jobs import Jobs
from service.observers import FailureSink
from service.router import ProviderRuntime, Router
from service.wshub import WsHub

#: Gauges copied from memory this often: a scrape every 1–15 s sees at most 1 s old values,
#: and the copy costs a few microseconds per provider.
SAMPLE_SEC: Final = 1.0
#: The jobs table is read every fifth sample: a DLQ grows over minutes, not seconds.
JOBS_SAMPLE_TICKS: Final = 5


class WebObserver:
    def __init__(self, failures: Sequence[FailureSink], tracing: Tracing | None) -> None:
        self._failures = tuple(failures)
        self._tracing = tracing
        self._bound: dict[tuple[str, str], AttemptMetrics] = {}

    def attempt_started(self, provider: ProviderRuntime, req: Request | EmbedRequest,
                        model: str, number: int) -> Attempt:
        bound = self._bound.get((provider.name, model))
        if bound is None:
            bound = self._bound[(provider.name, model)] = AttemptMetrics(provider.name, model)
        if self._tracing is None or not isinstance(req, Request):
            return bound  # embeddings: metrics only, no GenAI chat span
        p = provider.provider
        return self._tracing.attempt(bound, p, req.chat, p.models[model], number)

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None:
        for sink in self._failures:
            sink.attempt_failed(provider, err, request_id, model)

    def retrying(self, provider: str, delay: float) -> None:
        metrics.RETRIES.labels(provider).inc()
        metrics.RETRY_DELAY.labels(provider).observe(delay)
        if self._tracing is not None:
            self._tracing.event("bulwark.retry", {"bulwark.provider": provider,
                                                  "bulwark.delay_s": delay})

    def failing_over(self, from_provider: str, to_provider: str) -> None:
        if self._tracing is not None:
            self._tracing.event("bulwark.failover", {"bulwark.from_provider": from_provider,
                                                     "bulwark.to_provider": to_provider})

    def breaker_refused(self, provider: str) -> None:
        if self._tracing is not None:
            self._tracing.event("bulwark.breaker.refused", {"bulwark.provider": provider})

    def continued(self, from_provider: str, to_provider: str, at_char: int) -> None:
        """Hook for stream continuation (CONTRACT "Streams that survive their provider"):
        the dispatcher calls it when `to_provider` takes over a broken stream at `at_char`."""
        metrics.CONTINUATIONS.labels(to_provider).inc()
        if self._tracing is not None:
            self._tracing.event("bulwark.continuation", {
                "bulwark.from_provider": from_provider, "bulwark.to_provider": to_provider,
                "bulwark.at_char": at_char})


def breaker_hook(then: Callable[[Transition], None],
                 tracing: Tracing | None) -> Callable[[Transition], None]:
    def on_transition(t: Transition) -> None:
        metrics.breaker_moved(t.name, str(t.to_state))
        if tracing is not None:
            tracing.event("bulwark.breaker.transition", {
                "bulwark.provider": t.name, "bulwark.from_state": str(t.from_state),
                "bulwark.to_state": str(t.to_state), "bulwark.source": t.source})
        then(t)
    return on_transition


class Sampler:
    """Copies state kept in memory into gauges (and bus counters into counters)."""

    def __init__(self, router: Router, view: View, bus: Bus | None, *,
                 ws: WsHub | None = None, jobs: Jobs | None = None) -> None:
        self.router = router
        self.view = view
        self.bus = bus
        self.ws = ws
        self.jobs = jobs
        self._seen = {"reloads": 0, "reconnects": 0, "applied": 0}
        self._rtt_beats = 0

    def sample(self) -> None:
        metrics.flush()
        rows = self.view.rows
        trusted = self.router.shared_health_trusted()
        available: dict[str, int] = dict.fromkeys(self.router.models(), 0)
        for rt in self.router.runtimes.values():
            state = rt.breaker.state
            metrics.BREAKER_STATE.labels(rt.name).set(metrics.BREAKER_STATES[str(state)])
            row = rows.get(rt.name)
            down = state is State.OPEN or (
                trusted and row is not None and row.health is Health.UNHEALTHY)
            if not down:
                for model in rt.provider.models:
                    available[model] += 1
        for model, count in available.items():
            metrics.AVAILABLE_PROVIDERS.labels(model).set(count)
        metrics.DEGRADATION.set(float(effective(self.view, time.time())[0]))
        if self.ws is not None:
            metrics.WEBSOCKETS.set(len(self.ws.sockets))
        if self.bus is None:
            return
        age = self.view.healthd_age()
        metrics.HEALTHD_AGE.set(float("inf") if age is None else age)
        bus = self.bus
        for name, counter in (("reloads", metrics.BUS_RESYNCS),
                              ("reconnects", metrics.BUS_RECONNECTS),
                              ("applied", metrics.BUS_APPLIED)):
            value = int(getattr(bus, name))
            if value > self._seen[name]:
                counter.inc(value - self._seen[name])
            self._seen[name] = value
        if bus.heartbeats != self._rtt_beats and bus.last_heartbeat_rtt is not None:
            self._rtt_beats = bus.heartbeats
            metrics.BUS_RTT.observe(bus.last_heartbeat_rtt)
        if bus.last_heartbeat_at is not None:
            metrics.BUS_LAST_HEARTBEAT.set(bus.last_heartbeat_at)

    async def sample_jobs(self) -> None:
        """The queue's counts: one Postgres read (cached a second, shared with
        /health/dlq), every JOBS_SAMPLE_SEC, off the request path."""
        if self.jobs is None:
            return
        try:
            counts = await self.jobs.dlq()
        except ServiceUnavailable:
            return  # the store is unreachable: the gauges keep their last values
        metrics.DLQ_MESSAGES.set(counts["dead"])
        for status in ("queued", "running", "dead"):
            metrics.JOBS.labels(status).set(counts[status])

    async def run(self) -> None:
        ticks = 0
        while True:
            self.sample()
            if ticks % JOBS_SAMPLE_TICKS == 0:
                await self.sample_jobs()
            ticks += 1
            await asyncio.sleep(SAMPLE_SEC)


async def sample_ctx(app: web.Application) -> AsyncIterator[None]:
    """Runs after the bus's context: the sampler reads the bus when there is one."""
    router = app[keys.ROUTER]
    metrics.initialise({rt.name: list(rt.provider.models) for rt in router.runtimes.values()})
    sampler = Sampler(router, app[keys.VIEW], app.get(keys.BUS), ws=app.get(keys.WS),
                      jobs=app.get(keys.JOBS))
    task = asyncio.create_task(sampler.run(), name="metrics-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.flush()  # the last second's counts, before the process leaves


def tracing_ctx(env: Mapping[str, str] | None
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    """Tracing from the OTEL_* variables of `env` (the process's environment when None)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        tracing = setup_tracing(os.environ if env is None else env, service_name="bulwark-web")
        app[keys.TRACING] = tracing
        try:
            yield
        finally:
            if tracing is not None:
                # Bounded (SHUTDOWN_SEC), off the loop: a dead collector must not stall exit.
                await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
    return ctx
