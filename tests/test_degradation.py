"""The degradation ladder: one level for the fleet, from healthd or an operator, applied by
every web process, each level changing what a request gets (docs/DEGRADATION.md)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bulwark.bus import Bus
from bulwark.config import ModelPolicy, Settings
from bulwark.degradation import AUTO_KEY, OPERATOR_KEY, Degradation, Level, effective
from bulwark.state import FleetRow, Health, StateRow, View
from bulwark.wire import ChatRequest, Message
from healthd.degradation import auto_level
from service.dispatch import QueueInstead, Request
from service.keys import CACHE, DISPATCHER
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider
from tests.procs import ROOT, Spawn, until, write_providers

MSG: Any = [{"role": "user", "content": "hello"}]
CANNED = "Back in a minute."
DOWN = {"status": 503}


# ---- the rules, in memory --------------------------------------------------------------


def view_with(**rows: Any) -> View:
    view = View()
    view.replace_fleet(FleetRow(key=k, value=v, seq=1) for k, v in rows.items())
    return view


def test_effective_level_operator_then_auto_then_normal() -> None:
    """An operator's unexpired override wins; an expired one gives way to healthd's level;
    with neither the level is normal; an invalid row is ignored."""
    auto = {"level": "minor", "reason": "a provider down", "since": 1.0}
    op = {"level": "critical", "reason": "incident", "since": 2.0, "expires_at": 100.0,
          "by": "ops"}
    view = view_with(**{AUTO_KEY: auto, OPERATOR_KEY: op})
    level, status = effective(view, now=50.0)
    assert level is Level.CRITICAL and status.source == "operator"
    assert status.expires_at == 100.0 and status.reason == "incident"
    level, status = effective(view, now=100.0)
    assert level is Level.MINOR and status.source == "auto" and status.expires_at is None
    assert effective(View(), now=0.0)[0] is Level.NORMAL
    bad = view_with(**{OPERATOR_KEY: {"level": "apocalyptic"}, AUTO_KEY: auto})
    assert effective(bad, now=0.0)[0] is Level.MINOR


def test_expiry_is_honoured_on_read() -> None:
    """Degradation drops an expired override at the first read past expires_at, no write."""
    now = [10.0]
    view = view_with(**{OPERATOR_KEY: {"level": "severe", "reason": "r", "since": 0.0,
                                       "expires_at": 20.0}})
    deg = Degradation(view, clock=lambda: now[0])
    before = deg.level
    now[0] = 20.0
    assert (before, deg.level) == (Level.SEVERE, Level.NORMAL)
    assert deg.status().source == "auto"


def test_auto_level_thresholds() -> None:
    """Worst model decides: all usable normal; half minor; under half moderate; none severe;
    never critical by itself."""
    sims = ["a", "b", "c", "d"]
    providers = [provider(n, "http://127.0.0.1:1/v1") for n in sims]
    down = StateRow(provider="x", health=Health.UNHEALTHY)
    open_ = StateRow(provider="x", breaker="open")

    def level(*bad: str) -> Level:
        return auto_level(providers, {n: down if n in bad[:1] else open_
                                      for n in bad})[0]

    assert auto_level(providers, {})[0] is Level.NORMAL
    assert level("a") is Level.MINOR
    assert level("a", "b") is Level.MINOR
    assert level("a", "b", "c") is Level.MODERATE
    assert level("a", "b", "c", "d") is Level.SEVERE
    assert "0 of 4" in auto_level(providers, dict.fromkeys(sims, down))[1]


# ---- one process, each level's effect --------------------------------------------------


class Fleet:
    def __init__(self, sims: list[Sim], gw: Gateway, bus: Bus) -> None:
        self.sims, self.gw, self.bus = sims, gw, bus

    async def level(self, level: str, **extra: Any) -> None:
        """Set the operator level through the bus and wait until this gateway applies it."""
        value = {"level": level, "reason": "test", "since": 0.0, "expires_at": None,
                 "by": "test", **extra}
        await self.bus.put_fleet(OPERATOR_KEY, value, source="test")

        async def applied() -> bool:
            return bool((await self.get("/health/degradation"))["level"] == level)
        await until(applied, what=f"level {level}")

    async def get(self, path: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(
                str(self.gw.server.make_url(path))) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def chat(self, text: str = "hello", headers: dict[str, str] | None = None,
                   **body: Any) -> tuple[int, dict[str, str], bytes]:
        payload = {"model": "default", "messages": [{"role": "user", "content": text}],
                   **body}
        async with aiohttp.ClientSession() as s, s.post(
                f"{self.gw.base_url}/chat/completions", json=payload,
                headers=headers or {}) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def upstream_calls(self) -> int:
        return sum([(await s.stats())["chat"] for s in self.sims])


@pytest.fixture
async def fleet(sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> AsyncIterator[Fleet]:
    sims = [await sim(n) for n in ("alpha", "beta", "gamma", "delta")]
    providers = [provider(s.name, s.url, priority=i + 1) for i, s in enumerate(sims)]
    gw = await gateway(providers, settings=Settings(
        http_backoff_base_ms=0, database_url=pg_clean, max_attempts=4),
        models={"default": ModelPolicy(canned_reply=CANNED)})
    bus = Bus(pg_clean, View(), name="test-operator")
    yield Fleet(sims, gw, bus)
    await bus.close()


def request(text: str, **kw: Any) -> Request:
    chat = ChatRequest(model="default", messages=[Message(role="user", content=text)])
    return Request(chat=chat, request_id="t", deadline=1e12, passthrough={}, **kw)


async def test_minor_only_announces(fleet: Fleet) -> None:
    """minor: answers as at normal (a retry, no fallback), and every chat response — an
    answer, a stream and an error — says `minor`."""
    status, headers, _ = await fleet.chat()
    assert headers["x-bulwark-degradation"] == "normal"
    await fleet.level("minor")
    await fleet.sims[0].script(steps=[DOWN])
    status, headers, _ = await fleet.chat("retry me")
    assert status == 200 and headers["x-bulwark-degradation"] == "minor"
    assert headers["x-bulwark-provider"] == "alpha" and headers["x-bulwark-attempts"] == "2"
    status, headers, body = await fleet.chat(stream=True)
    assert status == 200 and headers["x-bulwark-degradation"] == "minor"
    assert body.endswith(b"data: [DONE]\n\n")
    status, headers, _ = await fleet.chat(model="no-such-model")
    assert status == 404 and headers["x-bulwark-degradation"] == "minor"


async def test_moderate_drops_retries_and_halves_the_attempt_cap(fleet: Fleet) -> None:
    """moderate: a failed provider is not retried (the next one answers), and a request
    makes at most half the attempts it would at normal."""
    await fleet.level("moderate")
    await fleet.sims[0].script(steps=[DOWN])
    status, headers, _ = await fleet.chat("retry me")
    assert status == 200 and headers["x-bulwark-provider"] == "beta"
    for s in fleet.sims:
        await s.script(then=DOWN)
    before = await fleet.upstream_calls()
    status, _, _ = await fleet.chat("nobody", {"Cache-Control": "no-cache"})
    assert status == 503
    assert await fleet.upstream_calls() - before == 2  # cap 4 halved
    await fleet.level("normal")
    before = await fleet.upstream_calls()
    status, _, _ = await fleet.chat("nobody again", {"Cache-Control": "no-cache"})
    assert status == 503
    assert await fleet.upstream_calls() - before == 4


async def test_severe_serves_stored_answers_first_and_queues_at_once(fleet: Fleet) -> None:
    """severe: a stored answer is served although providers are healthy, with no upstream
    call; a client that accepts a job is queued without any attempt."""
    status, _, _ = await fleet.chat("kept")
    assert status == 200
    await fleet.level("severe")
    before = await fleet.upstream_calls()
    status, headers, _ = await fleet.chat("kept")
    assert status == 200 and headers["x-bulwark-fallback"] == "cache"
    assert headers["x-bulwark-degradation"] == "severe"
    with pytest.raises(QueueInstead):
        await fleet.gw.app[DISPATCHER].complete(request("new", may_queue=True))
    assert await fleet.upstream_calls() == before
    status, headers, _ = await fleet.chat("new")  # no job accepted: live as usual
    assert status == 200 and headers["x-bulwark-fallback"] == "none"


async def test_critical_calls_no_provider(fleet: Fleet) -> None:
    """critical: not one upstream call; a stored answer, the canned reply (when accepted) or
    a 503 `service_degraded` instead."""
    status, _, _ = await fleet.chat("kept")
    assert status == 200
    await fleet.level("critical")
    before = await fleet.upstream_calls()
    status, headers, _ = await fleet.chat("kept")
    assert status == 200 and headers["x-bulwark-fallback"] == "cache"
    status, headers, body = await fleet.chat("new")
    assert status == 503 and json.loads(body)["error"]["code"] == "service_degraded"
    assert headers["x-bulwark-degradation"] == "critical" and "Retry-After" in headers
    status, headers, body = await fleet.chat("new", {"x-bulwark-accept-canned": "true"},
                                             stream=True)
    assert status == 200 and headers["x-bulwark-fallback"] == "canned"
    assert CANNED.split(maxsplit=1)[0].encode() in body and body.endswith(b"data: [DONE]\n\n")
    with pytest.raises(QueueInstead):
        await fleet.gw.app[DISPATCHER].complete(request("new", may_queue=True))
    assert await fleet.upstream_calls() == before
    assert fleet.gw.app[CACHE].hits >= 1


async def test_operator_level_expires_everywhere_by_itself(fleet: Fleet) -> None:
    """An override with an expiry stops applying once it passes, with no further write."""
    await fleet.level("critical", expires_at=time.time() + 1.0)
    status = await fleet.get("/health/degradation")
    assert status["source"] == "operator" and status["expires_at"] is not None

    async def expired() -> bool:
        return bool((await fleet.get("/health/degradation"))["level"] == "normal")
    await until(expired, what="expiry")
    code, headers, _ = await fleet.chat()
    assert code == 200 and headers["x-bulwark-fallback"] == "none"


# ---- real processes: the CLI, two web processes, healthd --------------------------------


async def cli(dsn: str, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, DATABASE_URL=dsn)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "healthd", "degrade", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_level_reaches_two_web_processes(sim: SimFactory, spawn: Spawn,
                                                   pg_clean: str, tmp_path: Any) -> None:
    """`python -m healthd degrade severe …` reaches both web processes (status endpoint and
    chat header); `degrade auto` takes both back; bad usage exits 2."""
    from tests.procs import free_port
    from tests.test_cluster import start_web

    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "providers.toml", [alpha])
    webs = [await start_web(spawn, pg_clean, providers, free_port()) for _ in range(2)]

    async def level_everywhere(level: str) -> bool:
        for web in webs:
            _, body = await web.get("/health/degradation")
            if body["level"] != level:
                return False
        return True

    rc, out, err = await cli(pg_clean, "severe", "--reason", "provider incident",
                             "--expires-in", "600")
    assert rc == 0, err
    assert json.loads(out)["level"] == "severe"
    await until(lambda: level_everywhere("severe"), what="severe on both")
    for web in webs:
        _, body = await web.get("/health/degradation")
        assert body["source"] == "operator" and body["reason"] == "provider incident"
        async with aiohttp.ClientSession() as s, s.post(
                f"{web.base}/v1/chat/completions",
                json={"model": "default", "messages": MSG}) as resp:
            assert resp.headers["x-bulwark-degradation"] == "severe"
    rc, _, err = await cli(pg_clean, "auto")
    assert rc == 0, err
    await until(lambda: level_everywhere("normal"), what="normal on both")
    rc, _, err = await cli(pg_clean, "severe")
    assert rc == 2 and "--reason" in err


async def test_healthd_publishes_the_automatic_level(sim: SimFactory, spawn: Spawn,
                                                     pg_clean: str, tmp_path: Any) -> None:
    """healthd lowers the level as providers fail its probes (one of two: minor; both:
    severe) and raises it back when they recover."""
    from tests.procs import heal

    sims = [await sim("alpha"), await sim("beta")]
    providers = write_providers(tmp_path / "providers.toml", sims)
    await spawn(pg_clean, providers)
    view = View()
    bus = Bus(pg_clean, view, name="test-watch")
    await bus.start()
    try:
        async def auto_is(level: str) -> bool:
            value = view.fleet_value(AUTO_KEY)
            return isinstance(value, dict) and value.get("level") == level

        await until(lambda: auto_is("normal"), what="normal")
        await sims[0].script(models_status=503)
        await until(lambda: auto_is("minor"), within=30, what="minor")
        await sims[1].script(models_status=503)
        await until(lambda: auto_is("severe"), within=30, what="severe")
        assert "0 of 2" in view.fleet_value(AUTO_KEY)["reason"]
        for s in sims:
            await heal(s)
        await until(lambda: auto_is("normal"), within=30, what="normal again")
    finally:
        await bus.close()
