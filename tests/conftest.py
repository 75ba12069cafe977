"""Shared fixtures: simulators on real sockets, the gateway app on a real port, the openai
SDK as its client, and (from tests/pg.py) a throwaway PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bulwark.config import ModelPolicy, Provider, ProviderConfig, Settings, resolve
from bulwark.sim import create_sim_app
from service.app import create_app
from tests.pg import db, pg_clean, pg_dsn  # noqa: F401  (fixtures)
from tests.procs import INTERVAL, ROOT, Daemon, Spawn

# Tests must not pick up a developer's own configuration.
for _var in ("DATABASE_URL", "BULWARK_PROVIDERS", "BULWARK_PORT", "PORT"):
    os.environ.pop(_var, None)


class Sim:
    """One simulator server, as a provider of the gateway."""

    def __init__(self, server: TestServer, name: str) -> None:
        self.server = server
        self.name = name
        self.url = str(server.make_url("/v1"))

    async def script(self, **script: Any) -> None:
        async with aiohttp.ClientSession() as s, s.post(
            self.server.make_url("/_sim/script"), json=script
        ) as resp:
            assert resp.status == 200, await resp.text()

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as s, s.get(
            self.server.make_url("/_sim/stats")
        ) as resp:
            data: dict[str, int] = await resp.json()
            return data


SimFactory = Callable[[str], Awaitable[Sim]]


@pytest.fixture
async def sim(aiohttp_server: Any) -> SimFactory:
    async def start(name: str) -> Sim:
        server = await aiohttp_server(create_sim_app(name))
        return Sim(server, name)

    return start


def provider(name: str, url: str, *, priority: int = 1, kind: str = "openai",
             settings: Settings | None = None, **overrides: Any) -> Provider:
    cfg = ProviderConfig(name=name, kind=kind, base_url=url, priority=priority,  # type: ignore[arg-type]
                         models=overrides.pop("models", {"default": "sim-1"}), **overrides)
    return resolve(cfg, settings or Settings())


class Gateway:
    def __init__(self, server: TestServer, app: web.Application) -> None:
        self.server = server
        self.app = app
        self.base_url = str(server.make_url("/v1"))

    def client(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="sk-client-test", **kw)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway(aiohttp_server: Any) -> AsyncIterator[GatewayFactory]:
    clients: list[openai.AsyncOpenAI] = []

    async def start(providers: list[Provider], *, settings: Settings | None = None,
                    env: dict[str, str] | None = None,
                    models: dict[str, ModelPolicy] | None = None) -> Gateway:
        # Tests retry without sleeping: backoff is tested on its own.
        s = settings or Settings(http_backoff_base_ms=0)
        app = create_app(s, providers, env=env or {}, models=models)
        server = await aiohttp_server(app)
        return Gateway(server, app)

    yield start
    for c in clients:
        await c.close()


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    daemons: list[Daemon] = []

    async def start(dsn: str | None, providers: Path, *, module: str = "healthd",
                    **extra: str) -> Daemon:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update({"HEALTHD_INTERVAL_SEC": str(INTERVAL), "BULWARK_PROVIDERS": str(providers),
                    "CB_RESET_SEC": "1", "LOG_LEVEL": "INFO", "LOG_FORMAT": "json", **extra})
        if dsn is not None:
            env["DATABASE_URL"] = dsn
        log = tmp_path / f"{module}-{len(daemons)}.log"
        with log.open("wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, cwd=ROOT, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink)
        daemon = Daemon(proc, log)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()
