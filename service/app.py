"""The web application: routes, the middleware, and every resource as a cleanup context."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.resolver import AsyncResolver

from bulwark.breaker import Breaker, BreakerConfig
from bulwark.bus import Bus
from bulwark.cache import ResponseCache
from bulwark.config import DEFAULT_POLICY, ModelPolicy, Provider, Settings
from bulwark.degradation import Degradation
from bulwark.errors import ServiceUnavailable
from bulwark.feedback import FeedbackWriter
from bulwark.http1 import Http1
from bulwark.providers.registry import make_adapter
from bulwark.retry import Backoff
from bulwark.state import View
from service import cors, edge, keys, openapi
from service.auth import Guard
from service.bulkhead import Bulkhead
from service.dispatch import Dispatcher
from service.jobs import jobs_contexts
from service.liveness import liveness_ctx
from service.observe import WebObserver, breaker_hook, sample_ctx, tracing_ctx
from service.observers import RecentFailures
from service.ratelimit import Limiter, PgStore
from service.router import ProviderRuntime, Router
from service.routes import (
    admin,
    chat,
    degradation,
    embeddings,
    feedback,
    health,
    health_detailed,
    jobs,
    metrics,
    status,
    ws,
)
from service.streams import OpenStreams
from service.sync import ErrorRecorder, StateSync, run_sync

log = logging.getLogger("bulwark.web")

#: How long before the drain deadline open streams get their error event: enough for the
#: write to reach the socket before aiohttp aborts the connection.
SHUTDOWN_MARGIN_SEC = 0.5


def create_app(settings: Settings, providers: list[Provider], *,
               models: Mapping[str, ModelPolicy] | None = None,
               env: Mapping[str, str] | None = None) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app[keys.PROVIDERS] = providers
    served = sorted({m for p in providers for m in p.models})
    app[keys.MODELS] = {m: (models or {}).get(m, DEFAULT_POLICY) for m in served}
    app[keys.VIEW] = View()
    app[keys.STREAMS] = OpenStreams()
    app[keys.CACHE] = ResponseCache(
        settings.database_url, max_entry_bytes=settings.cache_max_entry_bytes,
        memory_bytes=settings.cache_memory_bytes,
        lookup_timeout=settings.cache_lookup_timeout_ms / 1000.0)
    app[keys.DEGRADATION] = Degradation(app[keys.VIEW])
    guard = Guard(require_keys=settings.require_keys, metrics_token=settings.metrics_token,
                  bulkhead=Bulkhead(settings.max_in_flight,
                                    wait_sec=settings.bulkhead_wait_ms / 1000))
    app[keys.GUARD] = guard
    app[keys.VIEW].subscribe_fleet(guard.on_fleet)
    app.add_routes(chat.routes)
    app.add_routes(embeddings.routes)
    app.add_routes(health.routes)
    app.add_routes(degradation.routes)
    ws.install(app, settings)
    app.add_routes(admin.routes)
    app.add_routes(feedback.routes)
    app.add_routes(jobs.routes)
    app.add_routes(metrics.routes)
    app.add_routes(openapi.routes)
    cors.install(app, settings.cors_origins)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # One pool for all providers. 1000 sockets bound memory per process; 500 per host
        # lets a single provider take the whole of a c=128..500 burst without queueing in
        # the pool. DNS answers are cached a minute (providers sit behind stable CDNs).
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=500, ttl_dns_cache=60,
                                         resolver=AsyncResolver(), keepalive_timeout=30)
        http1 = Http1()  # the chat path's own client (bulwark/http1.py)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as session:
            app[keys.SESSION] = session
            app[keys.HTTP1] = http1
            try:
                yield
            finally:
                http1.close()

    async def router_ctx(app: web.Application) -> AsyncIterator[None]:
        session = app[keys.SESSION]
        runtimes: list[ProviderRuntime] = []
        tracing = app[keys.TRACING]
        # Until healthd is heard from, breakers recover on their own (passive mode).
        config = BreakerConfig.from_settings(settings, auto_half_open=True)
        sync = StateSync()
        for p in providers:
            adapter = make_adapter(p, session, retry_after_cap=settings.retry_after_cap_sec,
                                   env=env, http1=app[keys.HTTP1])
            breaker = Breaker(p.name, config,
                              on_transition=breaker_hook(sync.on_transition, tracing))
            runtimes.append(ProviderRuntime(p, adapter, breaker,
                                            wait_sec=settings.bulkhead_wait_ms / 1000))
        router = Router(runtimes, app[keys.VIEW], healthd_interval=settings.healthd_interval_sec)
        sync.attach(router)
        app[keys.VIEW].subscribe(sync.on_row)
        app[keys.VIEW].subscribe_fleet(sync.on_fleet)
        app[keys.ROUTER] = router
        app[keys.SYNC] = sync
        recorder = ErrorRecorder()
        app[keys.ERRORS] = recorder
        recent = RecentFailures()
        app[keys.RECENT_FAILURES] = recent
        app[keys.DISPATCHER] = Dispatcher(
            router, max_attempts=settings.max_attempts,
            backoff=Backoff(base_sec=settings.http_backoff_base_ms / 1000.0),
            observer=WebObserver(
                [recent, recorder] if settings.database_url else [recent], tracing),
            models=app[keys.MODELS], cache=app[keys.CACHE], degradation=app[keys.DEGRADATION],
            deadlines=app[keys.HTTP1].deadlines)  # one shared timer per process
        yield

    async def bus_ctx(app: web.Application) -> AsyncIterator[None]:
        sync = app[keys.SYNC]
        if not settings.database_url:
            # Rate limits on buckets of this process alone (one process: exact).
            leaser = asyncio.create_task(guard.limiter.run(), name="rate-leases")
            try:
                async for _ in run_sync(sync, None):
                    yield
            finally:
                leaser.cancel()
                await asyncio.gather(leaser, return_exceptions=True)
            return
        bus = Bus(settings.database_url, app[keys.VIEW], name=sync.name)
        app[keys.WS].store.listen(bus)  # its NOTIFY channel: before start()
        if keys.JOBS in app:
            app[keys.JOBS].attach(bus)  # LISTEN for jobs: before start()
        await bus.start()
        app[keys.BUS] = bus
        app[keys.FEEDBACK] = FeedbackWriter(bus)
        recorder = app[keys.ERRORS]
        flusher = asyncio.create_task(recorder.run(bus), name="service-errors")

        async def fetch(sql: str, args: Sequence[object]) -> list[tuple[Any, ...]] | None:
            rows = await bus.write("rate lease", lambda conn: conn.fetch(sql, *args))
            return None if rows is None else [tuple(r) for r in rows]

        # Rate limits lease from the shared buckets in Postgres (service/ratelimit.py).
        guard.limiter = Limiter(PgStore(fetch))
        leaser = asyncio.create_task(guard.limiter.run(), name="rate-leases")
        try:
            async for _ in run_sync(sync, bus):
                yield
        finally:
            leaser.cancel()
            flusher.cancel()
            await asyncio.gather(flusher, leaser, return_exceptions=True)
            await recorder.flush(bus)
            await bus.close()

    async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
        """The cache's writer (batched inserts) and its own small pool; without a database
        the cache is this process's LRU only."""
        cache = app[keys.CACHE]
        if not settings.database_url:
            yield
            return
        writer = asyncio.create_task(cache.run(), name="cache-writer")
        try:
            yield
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await cache.close()

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
    if settings.health_port is not None:
        app.cleanup_ctx.append(liveness_ctx(settings.host, settings.health_port))
    app.cleanup_ctx.append(streams_ctx)
    app.cleanup_ctx.append(session_ctx)
    app.cleanup_ctx.append(router_ctx)
    # Durable jobs need Postgres: their store before the bus (which LISTENs for them), their
    # worker after it (torn down first, returning its leases while the pool is still open).
    wiring = None if not settings.database_url else jobs_contexts(
        settings, env, jobs_key=keys.JOBS, dispatcher_key=keys.DISPATCHER,
        router_key=keys.ROUTER)
    if wiring is not None:
        app.cleanup_ctx.append(wiring.store)
    app.cleanup_ctx.append(bus_ctx)
    app.cleanup_ctx.append(cache_ctx)
    status.setup(app)
    app.add_routes(health_detailed.routes)
    app.cleanup_ctx.append(ws.ws_ctx)
    if wiring is not None:
        app.cleanup_ctx.append(wiring.worker)
        app.on_shutdown.append(wiring.on_shutdown)
    app.cleanup_ctx.append(sample_ctx)
    # Last: the document describes every route added above.
    app.cleanup_ctx.append(openapi.document_ctx)
    edge.install(app)  # last: every route is added
    return app
