"""The web application: routes, the middleware, and every resource as a cleanup context."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import web
from aiohttp.resolver import AsyncResolver

from bulwark.breaker import Breaker, BreakerConfig
from bulwark.bus import Bus
from bulwark.config import DEFAULT_POLICY, ModelPolicy, Provider, Settings
from bulwark.errors import ServiceUnavailable
from bulwark.providers.registry import make_adapter
from bulwark.retry import Backoff
from bulwark.state import View
from service import keys
from service.dispatch import Dispatcher
from service.edge import edge
from service.observe import WebObserver, breaker_hook, sample_ctx, tracing_ctx
from service.router import ProviderRuntime, Router
from service.routes import chat, health, metrics
from service.streams import OpenStreams
from service.sync import ErrorRecorder, StateSync, run_sync

log = logging.getLogger("bulwark.web")

#: How long before the drain deadline open streams get their error event: enough for the
#: write to reach the socket before aiohttp aborts the connection.
SHUTDOWN_MARGIN_SEC = 0.5


def create_app(settings: Settings, providers: list[Provider], *,
               models: Mapping[str, ModelPolicy] | None = None,
               env: Mapping[str, str] | None = None) -> web.Application:
    app = web.Application(middlewares=[edge], client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app[keys.PROVIDERS] = providers
    served = sorted({m for p in providers for m in p.models})
    app[keys.MODELS] = {m: (models or {}).get(m, DEFAULT_POLICY) for m in served}
    app[keys.VIEW] = View()
    app[keys.STREAMS] = OpenStreams()
    app.add_routes(chat.routes)
    app.add_routes(health.routes)
    app.add_routes(metrics.routes)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # One pool for all providers. 1000 sockets bound memory per process; 500 per host
        # lets a single provider take the whole of a c=128..500 burst without queueing in
        # the pool. DNS answers are cached a minute (providers sit behind stable CDNs).
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=500, ttl_dns_cache=60,
                                         resolver=AsyncResolver(), keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as session:
            app[keys.SESSION] = session
            yield

    async def router_ctx(app: web.Application) -> AsyncIterator[None]:
        session = app[keys.SESSION]
        runtimes: list[ProviderRuntime] = []
        tracing = app[keys.TRACING]
        # Until healthd is heard from, breakers recover on their own (passive mode).
        config = BreakerConfig.from_settings(settings, auto_half_open=True)
        sync = StateSync()
        for p in providers:
            adapter = make_adapter(p, session, retry_after_cap=settings.retry_after_cap_sec,
                                   env=env)
            breaker = Breaker(p.name, config,
                              on_transition=breaker_hook(sync.on_transition, tracing))
            runtimes.append(ProviderRuntime(p, adapter, breaker))
        router = Router(runtimes, app[keys.VIEW], healthd_interval=settings.healthd_interval_sec)
        sync.attach(router)
        app[keys.VIEW].subscribe(sync.on_row)
        app[keys.ROUTER] = router
        app[keys.SYNC] = sync
        recorder = ErrorRecorder()
        app[keys.ERRORS] = recorder
        app[keys.DISPATCHER] = Dispatcher(
            router, max_attempts=settings.max_attempts,
            backoff=Backoff(base_sec=settings.http_backoff_base_ms / 1000.0),
            observer=WebObserver(recorder if settings.database_url else None, tracing))
        yield

    async def bus_ctx(app: web.Application) -> AsyncIterator[None]:
        sync = app[keys.SYNC]
        if not settings.database_url:
            async for _ in run_sync(sync, None):
                yield
            return
        bus = Bus(settings.database_url, app[keys.VIEW], name=sync.name)
        await bus.start()
        app[keys.BUS] = bus
        recorder = app[keys.ERRORS]
        flusher = asyncio.create_task(recorder.run(bus), name="service-errors")
        try:
            async for _ in run_sync(sync, bus):
                yield
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await recorder.flush(bus)
            await bus.close()

    async def end_streams_before_the_kill(app: web.Application) -> None:
        """SIGTERM: aiohttp now waits up to drain_sec for in-flight requests, then aborts
        them. A stream still running shortly before that is ended with an error event, so
        the client never mistakes a cut for a complete answer."""

        err = ServiceUnavailable("The gateway is shutting down; the answer is incomplete.",
                                 code="gateway_shutdown", should_retry=True)
        app[keys.STREAMS].abandon_all_later(
            max(0.0, settings.drain_sec - SHUTDOWN_MARGIN_SEC), err)

    async def streams_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await app[keys.STREAMS].close()

    app.on_shutdown.append(end_streams_before_the_kill)
    app.cleanup_ctx.append(tracing_ctx(env))
    app.cleanup_ctx.append(streams_ctx)
    app.cleanup_ctx.append(session_ctx)
    app.cleanup_ctx.append(router_ctx)
    app.cleanup_ctx.append(bus_ctx)
    app.cleanup_ctx.append(sample_ctx)
    return app
