"""The status feed and /health/detailed against a gateway on a real port, a real Postgres
and a simulator on a socket (issue 8, items 4 and 5)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from bulwark.bus import Bus
from bulwark.config import Settings
from bulwark.state import View
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider
from tests.procs import until

pytestmark = pytest.mark.slow

SECRET = "sk-live-STATUS-CANARY-0123456789abcdef"
PROMPT = "PROMPT-CANARY please summarise my medical file"
CLIENT_ID = "CLIENT-CANARY-42"


class Feed:
    """One open `/status/events` stream, read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.raw = bytearray()

    async def next_state(self) -> dict[str, Any]:
        while True:
            end = self.raw.find(b"\n\n")
            if end >= 0:
                block, self.raw[:] = bytes(self.raw[:end]), self.raw[end + 2:]
                lines = block.decode().split("\n")
                if "event: state" in lines:
                    data = next(ln[6:] for ln in lines if ln.startswith("data: "))
                    state: dict[str, Any] = json.loads(data)
                    return state
                continue
            chunk = await self.resp.content.readany()
            assert chunk, "the stream ended"
            self.raw.extend(chunk)

    async def until(self, predicate: Any, what: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            state = await self.next_state()
            return state if predicate(state) else None
        # Each call waits for the next event; the bound keeps a broken feed from hanging.
        return await until(probe, within=20, what=what)


def alpha_of(state: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in state["providers"] if p["name"] == "alpha")


@pytest.fixture
async def setup(sim: SimFactory, gateway: GatewayFactory,
                pg_clean: str) -> AsyncIterator[tuple[Gateway, Sim, Bus]]:
    alpha, beta = await sim("alpha"), await sim("beta")
    settings = Settings(database_url=pg_clean, http_backoff_base_ms=0)
    providers = [provider("alpha", alpha.url, priority=1, api_key_env="ALPHA_KEY",
                          settings=settings),
                 provider("beta", beta.url, priority=2, settings=settings)]
    gw = await gateway(providers, settings=settings, env={"ALPHA_KEY": SECRET})
    # Another process's bus: what it writes reaches the gateway only through Postgres.
    other = Bus(pg_clean, View(), name="test-other")
    await other.start()
    yield gw, alpha, other
    await other.close()


async def open_feed(session: aiohttp.ClientSession, gw: Gateway) -> Feed:
    resp = await session.get(gw.server.make_url("/status/events"))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    return Feed(resp)


async def test_events_send_the_state_first_then_each_change(
        setup: tuple[Gateway, Sim, Bus]) -> None:
    """The first event is the whole current state; a breaker opened by another process
    (through the bus) and an operator's degradation level each arrive as a new state."""
    gw, _, other = setup
    async with aiohttp.ClientSession() as session:
        feed = await open_feed(session, gw)
        first = await feed.next_state()
        assert [p["name"] for p in first["providers"]] == ["alpha", "beta"]
        assert alpha_of(first)["breaker"] == "closed"
        assert first["degradation"]["level"] == "normal"
        assert first["shared"]["synced"] is True

        await other.publish("alpha", breaker="open", health="unhealthy",
                             reason="5 consecutive failures: server_error", source="web:x:1",
                             open_for=60)
        state = await feed.until(lambda s: alpha_of(s)["breaker"] == "open", "alpha open")
        alpha = alpha_of(state)
        assert alpha["health"] == "unhealthy"
        assert alpha["breaker_reason"] == "5 consecutive failures: server_error"
        # The change is in the recent incidents, by kind of writer, without its host.
        state = await feed.until(lambda s: s["incidents"], "incident listed")
        incident = state["incidents"][0]
        assert (incident["provider"], incident["to_state"], incident["by"]) == (
            "alpha", "open", "web")

        await other.put_fleet("degradation/operator", {
            "level": "severe", "reason": "provider outage drill", "since": 1.0,
            "expires_at": None, "by": "ops"}, source="test")
        state = await feed.until(lambda s: s["degradation"]["level"] == "severe", "severe")
        assert state["degradation"]["source"] == "operator"
        assert state["degradation"]["reason"] == "provider outage drill"
        await other.put_fleet("degradation/operator", None, source="test")
        await feed.until(lambda s: s["degradation"]["level"] == "normal", "back to normal")
        feed.resp.close()


async def test_a_page_opened_after_the_last_change_still_sees_new_probes(
        setup: tuple[Gateway, Sim, Bus], pg_clean: str) -> None:
    """Probe samples come without a notification: a page that opened while nothing else
    changed (no bus row moves after it) still gets them on the board's tick."""
    gw, _, _ = setup
    async with aiohttp.ClientSession() as session:
        feed = await open_feed(session, gw)
        first = await feed.next_state()
        assert alpha_of(first)["probes"] == []
        conn = await asyncpg.connect(pg_clean)
        try:
            await conn.execute("insert into health_samples (provider, ok, latency_ms) "
                               "values ('alpha', true, 12.5)")
        finally:
            await conn.close()
        state = await feed.until(lambda s: alpha_of(s)["probes"], "the new probe shown")
        assert alpha_of(state)["probes"][0]["latency_ms"] == 12.5
        feed.resp.close()


async def test_page_and_feed_never_show_secrets_prompts_or_client_ids(
        setup: tuple[Gateway, Sim, Bus]) -> None:
    """After failed attempts (recorded as service_errors) of a request with a prompt and a
    client's request id, to a provider whose key is set: the page, its assets, the feed and
    /health/detailed show the failures by class only — never the key, prompt or id."""
    gw, alpha, _ = setup
    await alpha.script(then={"status": 503})
    headers = {"x-request-id": CLIENT_ID, "Authorization": f"Bearer {SECRET}"}
    body = {"model": "default", "messages": [{"role": "user", "content": PROMPT}],
            "user": CLIENT_ID}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(gw.server.make_url("/v1/chat/completions"), json=body,
                                    headers=headers) as resp:
                assert resp.headers["x-bulwark-provider"] == "beta"
        feed = await open_feed(session, gw)
        state = await feed.until(lambda s: s["errors"], "failures listed")
        feed.resp.close()
        texts = [json.dumps(state)]
        for path in ("/status", "/status/static/status.js", "/status/static/status.css",
                     "/health/detailed"):
            async with session.get(gw.server.make_url(path)) as resp:
                assert resp.status == 200, path
                texts.append(await resp.text())
    assert {(e["provider"], e["error_class"]) for e in state["errors"]} == {
        ("alpha", "server_error")}
    for text in texts:
        for canary in (SECRET, PROMPT, "PROMPT-CANARY", CLIENT_ID, "ALPHA_KEY", alpha.url):
            assert canary not in text


async def test_health_detailed_reports_every_part(
        setup: tuple[Gateway, Sim, Bus], db: asyncpg.Connection) -> None:
    """/health/detailed (application/health+json): per provider health, breaker, last
    probe, TTFT p50/p95 from recent probes, this process's error mix of the last five
    minutes; Postgres round trip, bus heartbeat age, healthd heartbeat age."""
    gw, alpha, _ = setup
    await db.execute("""
        INSERT INTO health_samples (provider, at, ok, latency_ms, ttft_ms, error_class, status)
        SELECT 'alpha', now() - make_interval(secs => 100 - g), true, 10 + g, g, NULL, NULL
        FROM generate_series(1, 100) g""")
    await db.execute("""INSERT INTO health_samples (provider, ok, latency_ms, error_class, status)
                        VALUES ('beta', false, 3.5, 'server_error', 530)""")
    await alpha.script(steps=[{"status": 503}, {"fault": "reset"}, {"status": 503}])
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.server.make_url("/v1/chat/completions"), json={
                "model": "default", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.headers["x-bulwark-provider"] == "beta"
        async with session.get(gw.server.make_url("/health/detailed")) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/health+json"
            body = await resp.json(content_type=None)
    checks = body["checks"]

    def of(key: str, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [c for c in checks[key] if c["componentId"] == name]
        assert len(found) == 1 and found[0]["componentType"] == "provider"
        return found[0]

    assert body["status"] in ("pass", "warn")
    assert of("provider:health", "alpha")["observedValue"] == "unknown"
    assert of("provider:breaker", "alpha")["observedValue"] == "closed"
    assert of("provider:breaker", "alpha")["consecutiveFailures"] == 3
    last = of("provider:last_probe", "alpha")
    assert (last["observedValue"], last["ttftMs"], last["status"]) == (110.0, 100.0, "pass")
    assert of("provider:last_probe", "beta")["status"] == "fail"
    assert of("provider:last_probe", "beta")["output"] == "server_error (HTTP 530)"
    assert of("provider:ttft_p50", "alpha")["observedValue"] == pytest.approx(50.5, abs=0.1)
    assert of("provider:ttft_p95", "alpha")["observedValue"] == pytest.approx(95.05, abs=0.1)
    assert of("provider:ttft_p50", "beta")["observedValue"] is None
    assert of("provider:errors_5m", "alpha")["observedValue"] == {
        "network_reset": 1, "server_error": 2}
    assert of("provider:errors_5m", "beta")["observedValue"] == {}
    assert checks["postgres:reachable"][0]["status"] == "pass"
    assert checks["postgres:reachable"][0]["observedValue"] > 0
    assert checks["postgres:synced"][0]["observedValue"] is True
    assert checks["bus:heartbeat_age"][0]["observedValue"] is not None
    # No healthd runs here: its heartbeat is absent, which is a warning, not a failure.
    assert checks["healthd:heartbeat_age"][0]["status"] == "warn"
