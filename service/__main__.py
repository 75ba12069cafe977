"""`python -m service`: one web process. Run several on one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from bulwark.config import ConfigError, load_providers, settings_from_env
from bulwark.logs import provider_secrets, setup_logging
from service.app import create_app

log = logging.getLogger("bulwark.web")


def main() -> int:
    try:
        settings = settings_from_env()
        providers = load_providers(settings)
    except ConfigError as err:
        print(f"bulwark: {err}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format, secrets=provider_secrets(providers))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    app = create_app(settings, providers)

    async def announce(app: web.Application) -> None:
        log.info("web ready", extra={"host": settings.host, "port": settings.port,
                                     "providers": [p.name for p in providers]})

    app.on_startup.append(announce)
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    web.run_app(app, host=settings.host, port=settings.port, reuse_port=True,
                access_log=None, print=None, shutdown_timeout=settings.drain_sec, loop=loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
