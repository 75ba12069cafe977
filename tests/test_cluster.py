"""Shared provider state across real processes: two web processes and healthd on one
Postgres, against simulators on sockets (issue: web and healthd agree through Postgres)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from bulwark.bus import Bus
from bulwark.pgembed import EmbeddedPostgres
from bulwark.state import View
from schema.migrate import migrate
from tests.conftest import Sim, SimFactory
from tests.pg import throwaway_dir
from tests.procs import (
    ROOT,
    Daemon,
    Spawn,
    free_port,
    heal,
    health_is,
    holder,
    until,
    wait_live,
    write_providers,
)

pytestmark = pytest.mark.slow

CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}



class Web:
    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon = daemon
        self.base = f"http://127.0.0.1:{port}"

    async def chat(self) -> tuple[int, str, str]:
        """(status, provider, attempts) of one chat request."""
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.base}/v1/chat/completions", json=CHAT) as resp:
            await resp.read()
            return (resp.status, resp.headers.get("x-bulwark-provider", ""),
                    resp.headers.get("x-bulwark-attempts", ""))

    async def get(self, path: str) -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.base}{path}") as resp:
            return resp.status, await resp.json(content_type=None)


async def start_web(spawn: Spawn, dsn: str | None, providers: Path, port: int,
                    **extra: str) -> Web:
    daemon = await spawn(dsn, providers, module="service", BULWARK_PORT=str(port), **extra)
    web = Web(daemon, port)
    await wait_live(web.base)
    return web


def goes_to(web: Web, provider: str, attempts: str = "1"):  # type: ignore[no-untyped-def]
    async def probe() -> bool:
        status, name, n = await web.chat()
        return status == 200 and name == provider and n == attempts
    return probe


@pytest.fixture
async def two_sims(sim: SimFactory) -> tuple[Sim, Sim]:
    return await sim("alpha"), await sim("beta")


async def test_failing_provider_is_skipped_by_every_web_process_without_traffic(
        two_sims: tuple[Sim, Sim], spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """When provider 1 starts failing with no user traffic, healthd marks it unhealthy and
    both web processes go straight to provider 2 in one attempt; when it recovers, traffic
    returns to it."""
    alpha, beta = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha, beta])
    await spawn(pg_clean, providers)
    webs = [await start_web(spawn, pg_clean, providers, free_port()) for _ in range(2)]
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    for web in webs:
        await until(goes_to(web, "alpha"), what="alpha serves")
        status, ready = await web.get("/health/ready")
        assert (status, ready["status"]) == (200, "pass")

    before = (await alpha.stats())["chat"]
    await alpha.script(then={"status": 503}, include_probes=True)  # no user traffic now
    await until(health_is(db, "alpha", "unhealthy"), what="alpha unhealthy")
    for web in webs:
        await until(goes_to(web, "beta"), what="web skips alpha")
    # Once the view says unhealthy, requests do not touch alpha at all.
    assert (await alpha.stats())["chat"] == before
    for web in webs:
        assert await web.chat() == (200, "beta", "1")
    assert (await alpha.stats())["chat"] == before

    await heal(alpha)
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy again")
    for web in webs:
        await until(goes_to(web, "alpha"), what="traffic back on alpha")


async def test_breaker_tripped_in_one_process_opens_in_all(
        two_sims: tuple[Sim, Sim], spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """User traffic that trips alpha's breaker in web A is published: web B stops sending
    to alpha without having seen a failure itself; healthd's probes close it again. The
    failures are recorded as service_errors rows."""
    alpha, beta = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha, beta])
    await spawn(pg_clean, providers, CB_RESET_SEC="2")
    a, b = [await start_web(spawn, pg_clean, providers, free_port(), CB_RESET_SEC="2")
            for _ in range(2)]
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    await until(goes_to(b, "alpha"), what="b on alpha")
    await alpha.script(then={"status": 503})  # chat fails, probes still pass
    for _ in range(5):  # CB_FAIL_THRESHOLD consecutive failures, all through A
        status, name, _n = await a.chat()
        assert (status, name) == (200, "beta")
    await until(lambda: breaker_is(db, "alpha", "open"), what="breaker open in Postgres")
    # Each classified failure became a service_errors row (batched off the request path).
    await until(lambda: db.fetchval("select count(*) >= 5 from service_errors where "
                                    "provider = 'alpha' and error_class = 'server_error' "
                                    "and request_id like 'req_%'"),
                what="service_errors rows")
    seen = (await alpha.stats())["chat"]
    await until(lambda: b_breaker(b, "open"), what="B applied the open breaker")
    assert await b.chat() == (200, "beta", "1")
    assert (await alpha.stats())["chat"] == seen
    await heal(alpha)
    # healthd: open -> half_open after CB_RESET_SEC, probes succeed -> closed everywhere.
    await until(lambda: breaker_is(db, "alpha", "closed"), within=20, what="closed by healthd")
    for web in (a, b):
        await until(goes_to(web, "alpha"), what="alpha back")
    events = await db.fetch("select from_state, to_state, source from breaker_events "
                            "where provider = 'alpha' order by id")
    assert [(e["from_state"], e["to_state"]) for e in events][:3] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert events[0]["source"].startswith("web:")
    assert events[1]["source"] == "healthd"


async def breaker_is(db: asyncpg.Connection, provider: str, state: str) -> bool:
    value = await db.fetchval("select breaker from provider_state where provider = $1",
                              provider)
    return bool(value == state)


async def b_breaker(web: Web, state: str) -> bool:
    _, body = await web.get("/health/circuit-breakers")
    breakers = body["breakers"]
    assert isinstance(breakers, dict)
    return bool(breakers["alpha"]["state"] == state)


async def test_killing_the_active_healthd_changes_nothing_for_users(
        two_sims: tuple[Sim, Sim], spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """With a standby running, kill -9 of the active healthd: chat keeps answering, the
    standby takes over, and failure detection goes on."""
    alpha, beta = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha, beta])
    first, second = await spawn(pg_clean, providers), await spawn(pg_clean, providers)
    web = await start_web(spawn, pg_clean, providers, free_port())
    leader_name = await until(lambda: holder(db), what="a leader")
    leader = first if leader_name.endswith(f":{first.pid}") else second
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    leader.proc.kill()
    for _ in range(10):
        status, _, _ = await web.chat()
        assert status == 200
    await until(lambda: holder_changed(db, leader_name), what="standby took over")
    await alpha.script(then={"status": 503}, include_probes=True)
    await until(health_is(db, "alpha", "unhealthy"), what="detection goes on")
    await until(goes_to(web, "beta"), what="web follows the new leader")


async def holder_changed(db: asyncpg.Connection, old: str) -> bool:
    value = await holder(db)
    return value is not None and value != old


async def test_listener_terminated_leads_to_resync(
        two_sims: tuple[Sim, Sim], spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """pg_terminate_backend on web's LISTEN connection: it reconnects, reloads the snapshot
    and applies changes made meanwhile."""
    alpha, beta = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha, beta])
    web = await start_web(spawn, pg_clean, providers, free_port())
    await until(lambda: listener_count(db, 1), what="web listening")
    async with Bus(pg_clean, View(), name="test") as bus:
        killed = await db.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name like 'bulwark-bus web:%'")
        assert killed == 1
        # Published while web's listener is gone: only the reload can bring it in.
        await bus.publish("alpha", breaker="open", reason="test", source="test",
                          open_for=60)
    await until(lambda: b_breaker(web, "open"), what="web resynced")
    assert await web.chat() == (200, "beta", "1")


async def listener_count(db: asyncpg.Connection, n: int) -> bool:
    count = await db.fetchval("select count(*) from pg_stat_activity "
                              "where application_name like 'bulwark-bus web:%'")
    return bool(count == n)


@pytest.fixture
async def own_pg() -> AsyncIterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(throwaway_dir(), throwaway=True)
    await asyncio.to_thread(pg.start)
    await migrate(pg.dsn)
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.stop)


async def test_postgres_down_and_back(two_sims: tuple[Sim, Sim], spawn: Spawn,
                                      own_pg: EmbeddedPostgres, tmp_path: Path) -> None:
    """With Postgres stopped chat still answers and readiness says warn; after it restarts
    the web process resynchronises and state flows again."""
    alpha, beta = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha, beta])
    await spawn(own_pg.dsn, providers)
    web = await start_web(spawn, own_pg.dsn, providers, free_port())
    await until(goes_to(web, "alpha"), what="serving")
    await until(lambda: ready_is(web, "pass"), what="ready pass")

    await asyncio.to_thread(own_pg.stop)
    for _ in range(5):
        assert (await web.chat())[0] == 200
    await until(lambda: ready_is(web, "warn"), what="ready warn while Postgres is down")
    assert (await web.chat())[0] == 200

    await asyncio.to_thread(own_pg.start)
    await until(lambda: ready_is(web, "pass"), within=20, what="resynced")
    async with Bus(own_pg.dsn, View(), name="test") as bus:
        await bus.publish("alpha", breaker="open", reason="test", source="test", open_for=60)
    await until(lambda: b_breaker(web, "open"), what="state flows again")


async def ready_is(web: Web, status: str) -> bool:
    _, body = await web.get("/health/ready")
    return body["status"] == status


async def test_sigterm_drains_in_flight_requests(
        two_sims: tuple[Sim, Sim], spawn: Spawn, tmp_path: Path) -> None:
    """SIGTERM lets an in-flight request finish (well inside honcho's 5 s) and exits 0."""
    alpha, _ = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha])
    web = await start_web(spawn, None, providers, free_port())
    await alpha.script(then={"latency_ms": 1000})
    pending = asyncio.create_task(web.chat())
    await until(lambda: alpha_busy(alpha), what="request in flight")
    web.daemon.proc.send_signal(signal.SIGTERM)
    assert (await pending)[:2] == (200, "alpha")
    assert await asyncio.wait_for(web.daemon.proc.wait(), 10) == 0


async def alpha_busy(alpha: Sim) -> bool:
    return (await alpha.stats())["chat"] >= 1


async def test_honcho_formation_serves_one_port(pg_clean: str) -> None:
    """The repo's own Procfile under `honcho start -c web=2`: release migrates and stays
    idle (an exiting process would stop the formation), two web processes listen on one
    BULWARK_PORT, healthd runs, and the built-in simulator answers chat."""
    port, sim_port = free_port(), free_port()
    env = {**os.environ, "BULWARK_PORT": str(port), "LOG_FORMAT": "text",
           "DATABASE_URL": pg_clean, "HEALTHD_INTERVAL_SEC": "0.5",
           "BULWARK_SIM_URL": f"http://127.0.0.1:{sim_port}/v1",
           # honcho runs `python`: the venv's, as after `. .venv/bin/activate`.
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    honcho = subprocess.Popen(
        [str(Path(sys.executable).parent / "honcho"), "-f", str(ROOT / "Procfile"),
         "-d", str(ROOT), "start", "-c", "web=2"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await _check_two_listeners(port)
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{port}/health/ready") as resp:
            assert resp.status == 200
        assert honcho.poll() is None  # the formation is still up
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        out, _ = await asyncio.to_thread(honcho.communicate, timeout=15)
    text = out.decode(errors="replace")
    for name in ("release.1", "web.1", "web.2", "healthd.1"):
        assert name in text
    assert "release done" in text


async def _check_two_listeners(port: int) -> None:
    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await until(answers, within=20, what="honcho formation answering")
    await until(lambda: _listeners(port, 2), what="two listening sockets on one port")


async def _listeners(port: int, n: int) -> bool:
    hexport = f":{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    listening = [ln for ln in lines if ln.split()[1].endswith(hexport) and ln.split()[3] == "0A"]
    return len(listening) == n


async def test_shutdown_ends_a_long_stream_with_an_error_event(
        two_sims: tuple[Sim, Sim], spawn: Spawn, tmp_path: Path) -> None:
    """A stream still running when SIGTERM's drain period runs out ends with a
    gateway_shutdown error event (never a silent cut), and the process exits in time."""
    alpha, _ = two_sims
    providers = write_providers(tmp_path / "p.toml", [alpha])
    web = await start_web(spawn, None, providers, free_port(), BULWARK_DRAIN_SEC="1.5")
    await alpha.script(then={"chunks": 200, "chunk_delay_ms": 50})  # a 10 s answer
    body = bytearray()

    async def read_stream() -> None:
        async with aiohttp.ClientSession() as s, s.post(
                f"{web.base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
            async for chunk in resp.content.iter_any():
                body.extend(chunk)

    reader = asyncio.create_task(read_stream())
    await until(lambda: _has(body, b"Hello"), what="stream started")
    web.daemon.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(reader, 10)
    assert await asyncio.wait_for(web.daemon.proc.wait(), 10) == 0
    assert b'"code":"gateway_shutdown"' in body
    assert not body.endswith(b"data: [DONE]\n\n")


async def _has(body: bytearray, needle: bytes) -> bool:
    return needle in body
