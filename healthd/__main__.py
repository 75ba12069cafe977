"""`python -m healthd`: the health daemon (one active, others stand by).
`python -m healthd report --since 24h [--json]` prints the reliability report instead.

Exits only when told to (SIGTERM/SIGINT: 0, within 2 s) or on a configuration error (2):
honcho stops the whole formation when any process exits, so a transient fault — Postgres
down, a provider down, even a bug in one term of leadership — is waited out, never exited on.
"""

from __future__ import annotations

import os

# healthd's metrics are its own (HEALTHD_METRICS_PORT), never mixed into the web processes'
# multiprocess files: the variable must be gone before prometheus_client is imported.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec

from bulwark.breaker import BreakerConfig
from bulwark.bus import retention_days
from bulwark.config import (
    ConfigError,
    Provider,
    Settings,
    load_models,
    load_providers,
    settings_from_env,
)
from bulwark.jobstore import jobs_config
from bulwark.logs import provider_secrets, setup_logging
from bulwark.telemetry import Tracing
from bulwark.telemetry import setup as setup_tracing
from healthd import metrics
from healthd.app import Healthd, HealthdConfig, default_holder
from healthd.degradation import degrade_main

log = logging.getLogger("healthd")

#: For the orderly part of a stop. We promise exit within 2 s of SIGTERM (honcho SIGKILLs
#: after 5 s); what is left covers the abandoned remainder and interpreter exit.
STOP_BUDGET_SEC: Final = 1.5
#: After a crash of the daemon's main loop (a bug), wait this long before starting over.
RESTART_DELAY_SEC: Final = 1.0


def build_config(settings: Settings, env: Mapping[str, str],
                 cache_keep_sec: float = 86_400.0) -> HealthdConfig:
    if not settings.database_url:
        raise ConfigError(
            "DATABASE_URL is not set: healthd shares its state with the web processes through "
            "Postgres. Point it at the same database as web (for the embedded cluster, the DSN "
            "printed by `python -m bulwark.pgembed start`).")
    try:
        keep_days = retention_days(env)
        jobs = jobs_config(env)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    breaker = msgspec.structs.replace(
        # healthd drives recovery: its mirror breakers go half-open on their own, and two
        # good probes in a row close them.
        BreakerConfig.from_settings(settings, auto_half_open=True), half_open_successes=2)
    return HealthdConfig(
        dsn=settings.database_url,
        interval=settings.healthd_interval_sec,
        holder=default_holder(),
        breaker=breaker,
        retention_days=keep_days,
        retry_after_cap=settings.retry_after_cap_sec,
        cache_keep_sec=cache_keep_sec,
        cache_max_bytes=settings.cache_store_max_bytes,
        jobs=jobs,
    )


async def serve(config: HealthdConfig, providers: Sequence[Provider], *,
                host: str = "127.0.0.1", metrics_port: int = 0,
                tracing: Tracing | None = None) -> int:
    metrics.initialise([p.name for p in providers])
    async with metrics.serve_metrics(host, metrics_port):
        try:
            return await _run(config, providers, tracing)
        finally:
            if tracing is not None:
                # Bounded, off the loop: a dead collector must not delay the exit.
                await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)


async def _run(config: HealthdConfig, providers: Sequence[Provider],
               tracing: Tracing | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("healthd starting", extra={"holder": config.holder, "interval": config.interval,
                                         "providers": ",".join(p.name for p in providers)})
    while not stop.is_set():
        daemon = Healthd(config, providers, tracing=tracing)
        task = asyncio.create_task(daemon.run(stop), name="healthd")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            done, _ = await asyncio.wait({task}, timeout=STOP_BUDGET_SEC)
            if not done:
                log.warning("shutdown took too long; abandoning the rest of it")
                task.cancel()
                await asyncio.wait({task}, timeout=0.2)
            break
        stopping.cancel()
        err = task.exception()
        log.error("healthd stopped unexpectedly; starting over", exc_info=err)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RESTART_DELAY_SEC)
    log.info("healthd stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["report"]:
        from healthd.report import main as report

        return report(args[1:])
    if args[:1] == ["degrade"]:
        return degrade_main(args[1:])
    try:
        settings = settings_from_env()
        providers = load_providers(settings)
        # Stored answers older than every model's cache_ttl_sec can never be served.
        models = load_models(settings, providers)
        cache_keep = max((m.cache_ttl_sec for m in models.values()), default=86_400.0)
    except ConfigError as err:
        print(f"healthd: {err}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, secrets=provider_secrets(providers))
    try:
        config = build_config(settings, os.environ, cache_keep)
    except ConfigError as err:
        log.error("%s", err)  # noqa: TRY400 - a configuration error, not a crash: no traceback
        return 2
    tracing = setup_tracing(os.environ, service_name="bulwark-healthd")
    return asyncio.run(serve(config, providers, host=settings.host,
                             metrics_port=metrics.port_from(os.environ), tracing=tracing))


if __name__ == "__main__":
    sys.exit(main())
