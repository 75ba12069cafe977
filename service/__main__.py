"""`python -m service`: one web process. Run several on one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from aiohttp import web

from bulwark.config import (
    ConfigError,
    Provider,
    Settings,
    load_models,
    load_providers,
    providers_path,
    settings_from_env,
)
from bulwark.logs import provider_secrets, setup_logging
from bulwark.multiproc import prepare as prepare_metrics

log = logging.getLogger("bulwark.web")


def embedded_simulator(
        settings: Settings,
        providers: list[Provider]) -> Callable[[web.Application], AsyncIterator[None]]:
    """With no providers file, the built-in simulator fleet (one simulator per provider of
    `sim_providers`) answers at BULWARK_SIM_URL, served from this process, so that
    `python -m service` alone answers a first curl. Several web processes share its port
    like they share theirs (each with its own simulator state: a `/_sim/fail` reaches one
    of them; `ops/run` starts one web process); an external simulator already on that
    port (tests) is used instead."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from bulwark.sim import create_fleet_app

        url = urlsplit(settings.sim_url)
        fleet = create_fleet_app([p.name for p in providers])
        runner = web.AppRunner(fleet, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, url.hostname or "127.0.0.1", url.port or 9100,
                           reuse_port=True)
        try:
            await site.start()
            log.info("no providers file: built-in simulator serving",
                     extra={"url": settings.sim_url,
                            "providers": ",".join(p.name for p in providers)})
        except OSError:
            log.info("no providers file: using the simulator already at %s", settings.sim_url)
        try:
            yield
        finally:
            await runner.cleanup()

    return ctx


def main() -> int:
    if sys.argv[1:2] == ["keys"]:
        # Imported only here: the web start does not load the CLI.
        from service.keycli import main as keys_main

        return keys_main(sys.argv[2:])
    try:
        settings = settings_from_env()
        providers = load_providers(settings)
        models = load_models(settings, providers)
    except ConfigError as err:
        print(f"bulwark: {err}", file=sys.stderr)
        return 2
    secrets = [*provider_secrets(providers), settings.admin_token or "",
               settings.metrics_token or ""]
    setup_logging(settings.log_level, settings.log_format, secrets=secrets)
    # Before anything imports prometheus_client (service.app does): it picks multiprocess
    # mode at import, and every web process of this host must write to one directory.
    prepare_metrics(settings.host, settings.port)
    from service.app import create_app

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    app = create_app(settings, providers, models=models)
    if providers_path(settings) is None:
        app.cleanup_ctx.insert(0, embedded_simulator(settings, providers))

    def announce(_: str) -> None:
        # run_app calls this once every site is bound: "ready" means accepting requests.
        log.info("web ready", extra={"host": settings.host, "port": settings.port,
                                     "providers": ",".join(p.name for p in providers)})

    # handler_cancellation: a client that hangs up cancels its handler, and with it the
    # upstream request — no tokens generated (and billed) for nobody. It is also how the
    # test server runs, so tests see what production does.
    web.run_app(app, host=settings.host, port=settings.port, reuse_port=True,
                access_log=None, print=announce, shutdown_timeout=settings.drain_sec,
                handler_cancellation=True, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
