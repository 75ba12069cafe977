"""Helpers for tests that run real processes (web, healthd) against real Postgres."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import asyncpg

if TYPE_CHECKING:
    from tests.conftest import Sim

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.5
T = TypeVar("T")


async def until(probe: Callable[[], Awaitable[T | None]], *, within: float = 15.0,
                what: str = "condition") -> T:
    """Poll until probe() returns something truthy; fail after `within` seconds (a bound
    that keeps a broken test from hanging, not a timing claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_live(base: str, *, within: float = 15.0) -> None:
    """Until `base`/health/live answers 200: a process just spawned is serving."""
    async def live() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/health/live") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False
    await until(live, within=within, what=f"{base} live")


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 20)


Spawn = Callable[..., Awaitable["Daemon"]]


async def heal(target: Sim) -> None:
    async with aiohttp.ClientSession() as s, s.post(
        target.server.make_url("/_sim/reset")) as resp:
        assert resp.status < 300


def write_providers(path: Path, sims: list[Sim]) -> Path:
    """A providers file in the order given: priorities 1, 2, … so that routing between
    healthy providers is deterministic (equal priorities would share load at random)."""
    blocks = [
        f'[[providers]]\nname = "{s.name}"\nkind = "openai"\nbase_url = "{s.url}"\n'
        f'priority = {i}\napi_key_env = "{s.name.upper()}_KEY"\n'
        f'[providers.models]\ndefault = "sim-1"\n'
        for i, s in enumerate(sims, start=1)
    ]
    path.write_text("\n".join(blocks))
    return path


async def state_of(db: asyncpg.Connection, provider: str) -> asyncpg.Record | None:
    return await db.fetchrow("select * from provider_state where provider = $1", provider)


def health_is(db: asyncpg.Connection, provider: str,
              health: str) -> Callable[[], Awaitable[asyncpg.Record | None]]:
    async def probe() -> asyncpg.Record | None:
        row = await state_of(db, provider)
        return row if row is not None and row["health"] == health else None
    return probe


async def holder(db: asyncpg.Connection) -> str | None:
    value = await db.fetchval("select holder from healthd_heartbeat where id = 1")
    return None if value is None else str(value)

