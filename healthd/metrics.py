"""healthd's own Prometheus metrics, served on their own port (`HEALTHD_METRICS_PORT`).

healthd is one process (plus standbys), so its metrics live in a registry of its own, not in
the web processes' multiprocess files: `GET http://HOST:HEALTHD_METRICS_PORT/metrics`.
Default port 9465; `0` turns the endpoint off. A standby on the same host finds the port
taken, says so once, and runs without it (give each instance its own port to scrape both).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Final

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from bulwark.providers.base import ProbeResult
from bulwark.state import Health

log = logging.getLogger("healthd")

PORT_ENV: Final = "HEALTHD_METRICS_PORT"
DEFAULT_PORT: Final = 9465
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

_PROBE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

PROBES = Counter(
    "bulwark_healthd_probes_total",
    "Health probes, by provider and result: ok, or the failure's error class.",
    ["provider", "result"], registry=REGISTRY)
PROBE_DURATION = Histogram(
    "bulwark_healthd_probe_duration_seconds",
    "Duration of one health probe, by provider and outcome (ok, fail).",
    ["provider", "outcome"], buckets=_PROBE_BUCKETS, registry=REGISTRY)
PROBE_TTFT = Histogram(
    "bulwark_healthd_probe_ttft_seconds",
    "Time to the first token of a chat probe.", ["provider"], buckets=_PROBE_BUCKETS,
    registry=REGISTRY)
HEALTH = Gauge(
    "bulwark_healthd_provider_health",
    "healthd's verdict: 0 unknown, 1 healthy, 2 degraded, 3 unhealthy.", ["provider"],
    registry=REGISTRY)
HEALTH_VALUES: Final = {Health.UNKNOWN: 0.0, Health.HEALTHY: 1.0, Health.DEGRADED: 2.0,
                        Health.UNHEALTHY: 3.0}
LEADER = Gauge(
    "bulwark_healthd_leader", "1 while this healthd holds the lock and probes.",
    registry=REGISTRY)
HEARTBEAT_AGE = Gauge(
    "bulwark_healthd_heartbeat_age_seconds",
    "Age of the leader's last heartbeat on the database clock (+Inf: none yet).",
    registry=REGISTRY)


def initialise(providers: list[str]) -> None:
    for name in providers:
        HEALTH.labels(name).set(0.0)
        PROBES.labels(name, "ok")
        for outcome in ("ok", "fail"):
            PROBE_DURATION.labels(name, outcome)
    LEADER.set(0.0)
    HEARTBEAT_AGE.set(float("inf"))


def probed(name: str, result: ProbeResult) -> None:
    PROBES.labels(name, "ok" if result.ok else (result.error_class or "unknown")).inc()
    PROBE_DURATION.labels(name, "ok" if result.ok else "fail").observe(result.latency_ms / 1000)
    if result.ttft_ms is not None:
        PROBE_TTFT.labels(name).observe(result.ttft_ms / 1000)


def port_from(env: Mapping[str, str]) -> int:
    raw = env.get(PORT_ENV, "").strip()
    if not raw:
        return DEFAULT_PORT
    try:
        port = int(raw)
    except ValueError:
        log.warning("%s=%r is not a port; using %d", PORT_ENV, raw, DEFAULT_PORT)
        return DEFAULT_PORT
    return port if 0 <= port < 65536 else DEFAULT_PORT


async def _scrape(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE})


@asynccontextmanager
async def serve_metrics(host: str, port: int) -> AsyncIterator[int | None]:
    """Serve `/metrics` while inside; yields the bound port (None: off or port taken)."""
    if port == 0:
        yield None
        return
    app = web.Application()
    app.router.add_get("/metrics", _scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as err:
            log.warning("metrics endpoint not served: %s:%d is taken (%s)", host, port,
                        err.strerror or type(err).__name__)
            yield None
            return
        log.info("metrics endpoint serving", extra={"host": host, "port": port})
        yield port
    finally:
        await runner.cleanup()
