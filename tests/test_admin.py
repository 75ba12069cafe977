"""The operator API in one gateway over real sockets and a real Postgres: auth, breakers,
degradation, keys, bad input and the audit trail."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from bulwark.config import Settings
from service.keys import ROUTER, VIEW
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider
from tests.pg import eventually
from tests.procs import until

pytestmark = pytest.mark.slow

TOKEN = "adm-0123456789-abcdefghij-token"
MSG: Any = [{"role": "user", "content": "Hi"}]


async def make(sim: SimFactory, gateway: GatewayFactory, dsn: str | None,
               token: str | None = TOKEN) -> tuple[Gateway, Sim, Sim]:
    alpha, beta = await sim("alpha"), await sim("beta")
    settings = Settings(http_backoff_base_ms=0, database_url=dsn, admin_token=token)
    gw = await gateway([provider("alpha", alpha.url, priority=1),
                        provider("beta", beta.url, priority=2)], settings=settings)
    if dsn is not None:
        await eventually(lambda: gw.app[VIEW].synced)
    return gw, alpha, beta


async def call(gw: Gateway, method: str, path: str, *, token: str | None = TOKEN,
               **kw: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.request(
            method, gw.server.make_url(path), headers=headers, **kw) as resp:
        text = await resp.text()
        body = await resp.json(content_type=None) if text and "json" in resp.content_type else {}
        return resp.status, body, dict(resp.headers)


async def chat(gw: Gateway, key: str | None = None, model: str = "default") -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw.base_url}/chat/completions", json={"model": model, "messages": MSG},
            headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-bulwark-provider", "")


async def test_admin_refuses_without_token_with_a_wrong_one_and_when_none_is_set(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """No token, a wrong token, another scheme → 401; no token configured → 401 always; the
    token never appears in an answer."""
    gw, _, _ = await make(sim, gateway, pg_clean)
    path = "/admin/reliability/circuit-breakers"
    for token, headers in ((None, {}), ("wrong", {}), (None, {"Authorization": f"Basic {TOKEN}"})):
        status, body, _ = await call(gw, "GET", path, token=token, headers=headers)
        assert (status, body["error"]["code"]) == (401, "invalid_admin_token")
        assert TOKEN not in str(body)
    status, body, _ = await call(gw, "GET", path)
    assert status == 200
    assert [b["provider"] for b in body["breakers"]] == ["alpha", "beta"]

    off, _, _ = await make(sim, gateway, pg_clean, token=None)
    for token in (None, TOKEN, ""):
        status, body, _ = await call(off, "POST", path + "/alpha/reset", token=token)
        assert (status, body["error"]["code"]) == (401, "admin_disabled")


async def test_force_open_reset_and_the_audit_trail(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str, db: asyncpg.Connection) -> None:
    """Force-open takes a provider out of routing (nothing reaches it), shows in the fleet
    view with its reason; reset brings it back; both are audit rows with the address."""
    gw, alpha, _ = await make(sim, gateway, pg_clean)
    assert await chat(gw) == (200, "alpha")
    status, body, _ = await call(
        gw, "POST", "/admin/reliability/circuit-breakers/alpha/force-open",
        json={"reason": "maintenance window"}, headers={"x-bulwark-operator": "ann"})
    assert status == 200, body
    assert body["forced"]["expires_at"] is None and body["forced"]["by"] == "ann@127.0.0.1"
    await eventually(lambda: gw.app[ROUTER].runtimes["alpha"].forced_until > 0)
    seen = (await alpha.stats())["chat"]
    for _ in range(3):
        assert await chat(gw) == (200, "beta")
    assert (await alpha.stats())["chat"] == seen
    _, listing, _ = await call(gw, "GET", "/admin/reliability/circuit-breakers")
    row = listing["breakers"][0]
    assert row["breaker"] == "open" and row["forced"]["reason"] == "maintenance window"

    status, body, _ = await call(gw, "POST",
                                 "/admin/reliability/circuit-breakers/alpha/reset")
    assert (status, body["breaker"]) == (200, "closed")
    await eventually(lambda: gw.app[ROUTER].runtimes["alpha"].forced_until == 0)
    assert await chat(gw) == (200, "alpha")
    rows = await db.fetch("select action, target, reason, actor, address from admin_audit "
                          "order by id")
    assert [(r["action"], r["target"]) for r in rows] == [
        ("breaker.force_open", "alpha"), ("breaker.reset", "alpha")]
    assert rows[0]["reason"] == "maintenance window" and rows[0]["actor"] == "ann"
    assert all(r["address"] == "127.0.0.1" for r in rows)
    assert await db.fetchval("select breaker from provider_state where provider='alpha'") \
        == "closed"


async def test_force_open_expires_by_itself(sim: SimFactory, gateway: GatewayFactory,
                                            pg_clean: str) -> None:
    """A force-open with an expiry lets traffic back to the provider once it passes."""
    gw, alpha, _ = await make(sim, gateway, pg_clean)
    status, body, _ = await call(
        gw, "POST", "/admin/reliability/circuit-breakers/alpha/force-open",
        json={"reason": "short", "expires_in_sec": 1})
    assert status == 200 and body["forced"]["expires_at"] > body["forced"]["since"]
    await eventually(lambda: gw.app[ROUTER].runtimes["alpha"].forced_until > 0)
    assert await chat(gw) == (200, "beta")

    async def back() -> bool:
        return await chat(gw) == (200, "alpha")
    await until(back, what="traffic back on alpha after the expiry")
    assert (await alpha.stats())["chat"] >= 1


async def test_bad_input_names_the_field_and_unknown_provider_is_404(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """Malformed admin bodies are 400 with `param` naming the field; a provider that does not
    exist is a 404; a key that does not exist is a 404."""
    gw, _, _ = await make(sim, gateway, pg_clean)
    base = "/admin/reliability/circuit-breakers"
    cases: list[tuple[str, str, Any, str | None]] = [
        (f"{base}/alpha/force-open", "POST", {}, "reason"),
        (f"{base}/alpha/force-open", "POST", {"reason": ""}, "reason"),
        (f"{base}/alpha/force-open", "POST", {"reason": "x", "expires_in_sec": -1},
         "expires_in_sec"),
        (f"{base}/alpha/force-open", "POST", {"reason": "x", "colour": "red"}, "colour"),
        ("/admin/reliability/degradation", "POST", {"level": "bogus", "reason": "x"},
         "level"),
        ("/admin/reliability/degradation", "POST", {"level": "minor"}, "reason"),
        ("/admin/keys", "POST", {"name": ""}, "name"),
        ("/admin/keys", "POST", {"name": "a", "rpm": "many"}, "rpm"),
        ("/admin/keys", "POST", {"name": "a", "models": []}, "models"),
    ]
    for path, method, body, param in cases:
        status, answer, _ = await call(gw, method, path, json=body)
        assert status == 400, (path, body, answer)
        assert answer["error"]["param"] == param, (path, body, answer)
    status, answer, _ = await call(gw, "POST", f"{base}/alpha/force-open", data=b"{nope")
    assert (status, answer["error"]["code"]) == (400, "invalid_json")
    status, answer, _ = await call(gw, "POST", f"{base}/nobody/force-open",
                                   json={"reason": "x"})
    assert (status, answer["error"]["code"]) == (404, "provider_not_found")
    status, answer, _ = await call(gw, "DELETE", "/admin/keys/000000000000")
    assert (status, answer["error"]["code"]) == (404, "key_not_found")


async def test_degradation_set_by_body_or_query_and_cleared(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str, db: asyncpg.Connection) -> None:
    """The operator level is written as the fleet row `degradation/operator` (from a JSON body
    or query parameters), applied by the view, and deleted again by DELETE; all audited."""
    gw, _, _ = await make(sim, gateway, pg_clean)
    view = gw.app[VIEW]
    status, body, _ = await call(gw, "POST", "/admin/reliability/degradation",
                                 json={"level": "severe", "reason": "incident 42",
                                       "expires_in_sec": 600})
    assert status == 200 and body["level"] == "severe"
    await eventually(lambda: (view.fleet_value("degradation/operator") or {}).get("level")
                     == "severe")
    value = view.fleet_value("degradation/operator")
    assert value["reason"] == "incident 42" and value["expires_at"] - value["since"] == 600
    status, _, _ = await call(gw, "POST", "/admin/reliability/degradation",
                              params={"level": "minor", "reason": "by query"})
    assert status == 200
    await eventually(lambda: (view.fleet_value("degradation/operator") or {}).get("level")
                     == "minor")
    status, body, _ = await call(gw, "GET", "/admin/reliability/degradation")
    assert (body["level"], body["source"]) == ("minor", "operator")
    status, _, _ = await call(gw, "DELETE", "/admin/reliability/degradation")
    assert status == 200
    await eventually(lambda: view.fleet_value("degradation/operator") is None)
    actions = await db.fetch("select action, target from admin_audit order by id")
    assert [(a["action"], a["target"]) for a in actions] == [
        ("degradation.set", "severe"), ("degradation.set", "minor"),
        ("degradation.clear", "auto")]


async def test_admin_writes_without_a_database_are_503(sim: SimFactory,
                                                       gateway: GatewayFactory) -> None:
    """With no DATABASE_URL, reading the breakers works and every write is a clear 503."""
    gw, _, _ = await make(sim, gateway, None)
    status, _, _ = await call(gw, "GET", "/admin/reliability/circuit-breakers")
    assert status == 200
    for method, path, body in (
            ("POST", "/admin/reliability/circuit-breakers/alpha/force-open", {"reason": "x"}),
            ("POST", "/admin/reliability/degradation", {"level": "minor", "reason": "x"}),
            ("POST", "/admin/keys", {"name": "k"}), ("GET", "/admin/keys", None)):
        status, answer, _ = await call(gw, method, path, json=body)
        assert (status, answer["error"]["code"]) == (503, "database_unavailable")
        assert "DATABASE_URL" in answer["error"]["message"]


async def test_client_keys_through_the_admin_api(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str, db: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture) -> None:
    """Once a key exists /v1 needs one (the SDK's AuthenticationError), the allow-list is a
    403 model_not_allowed, health stays open, revocation is a 401; neither the key nor the
    admin token is in any row or log line."""
    caplog.set_level(logging.INFO)
    gw, _, _ = await make(sim, gateway, pg_clean)
    assert await chat(gw) == (200, "alpha")  # no key yet: open
    status, created, _ = await call(gw, "POST", "/admin/keys",
                                    json={"name": "team a", "models": ["default"]})
    assert status == 201
    key = created["key"]
    assert key.startswith(f"bwk_{created['id']}_") and len(key) == 60
    assert "hash" not in created
    await eventually(lambda: bool(gw.app[VIEW].fleet_value(f"clientkey/{created['id']}")))

    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-nothing",
                                  max_retries=0) as anon:
        with pytest.raises(openai.AuthenticationError) as denied:
            await anon.chat.completions.create(model="default", messages=MSG)
    assert denied.value.code == "invalid_api_key"
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        answer = await client.chat.completions.create(model="default", messages=MSG)
        assert answer.choices[0].finish_reason == "stop"
        with pytest.raises(openai.PermissionDeniedError) as forbidden:
            await client.chat.completions.create(model="other", messages=MSG)
    # Outside its list is a 403 whether the model exists or not: nothing to learn.
    assert forbidden.value.code == "model_not_allowed"
    restricted = await call(gw, "POST", "/admin/keys", json={"name": "b", "models": ["x"]})
    await eventually(lambda: bool(gw.app[VIEW].fleet_value(f"clientkey/{restricted[1]['id']}")))
    assert await chat(gw, restricted[1]["key"]) == (403, "")
    async with aiohttp.ClientSession() as s, s.get(gw.server.make_url("/health/live")) as r:
        assert r.status == 200

    status, listing, _ = await call(gw, "GET", "/admin/keys")
    assert [k["name"] for k in listing["data"]] == ["team a", "b"]
    assert all("key" not in k and "hash" not in k for k in listing["data"])
    status, revoked, _ = await call(gw, "DELETE", f"/admin/keys/{created['id']}")
    assert (status, revoked["revoked"]) == (200, True)

    async def refused() -> bool:
        return (await chat(gw, key))[0] == 401
    await until(refused, what="revoked key refused")

    for table in ("admin_audit", "client_keys", "fleet_state"):
        dump = str([dict(r) for r in await db.fetch(f"select * from {table}")])
        assert key not in dump and key.rsplit("_", 1)[1] not in dump and TOKEN not in dump
    assert key not in caplog.text and TOKEN not in caplog.text
    assert "admin action" in caplog.text


async def test_expired_key_is_401_and_metrics_token(sim: SimFactory, gateway: GatewayFactory,
                                                    pg_clean: str) -> None:
    """An expired key is a 401 (never a 500); `/metrics` needs BULWARK_METRICS_TOKEN when set."""
    alpha = await sim("alpha")
    settings = Settings(http_backoff_base_ms=0, database_url=pg_clean, admin_token=TOKEN,
                        metrics_token="metrics-secret-0123456789")
    gw = await gateway([provider("alpha", alpha.url)], settings=settings)
    await eventually(lambda: gw.app[VIEW].synced)
    _, created, _ = await call(gw, "POST", "/admin/keys",
                               json={"name": "brief", "expires_in_sec": 0.5})
    await eventually(lambda: bool(gw.app[VIEW].fleet_value(f"clientkey/{created['id']}")))

    async def expired() -> bool:
        status, _ = await chat(gw, created["key"])
        assert status in (200, 401)
        return status == 401
    await until(expired, what="the key expired")
    status, body, _ = await call(gw, "GET", "/metrics", token=None)
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, _, headers = await call(gw, "GET", "/metrics", token="metrics-secret-0123456789")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")


async def test_reliability_report_endpoint(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str, db: asyncpg.Connection) -> None:
    """The admin report serves what the history tables say over `?since=`; a bad period is
    a 400 naming `since`; it needs the admin token."""
    gw, _, _ = await make(sim, gateway, pg_clean)
    await db.execute("insert into providers (name, kind, base_url, models) values "
                     "('alpha', 'openai', 'http://x', '{}'), ('beta', 'openai', 'http://y', '{}')")
    await db.execute("insert into health_samples (provider, ok) values ('alpha', true), "
                     "('alpha', false), ('beta', true)")
    await db.execute("insert into service_errors (provider, error_class) values "
                     "('alpha', 'server_error')")
    status, body, _ = await call(gw, "GET", "/admin/reliability/reports/reliability?since=1h")
    assert status == 200, body
    by_name = body["providers"]
    assert by_name["alpha"]["availability"] == 0.5
    assert by_name["alpha"]["failures_by_class"] == {"server_error": 1}
    assert by_name["beta"]["availability"] == 1.0
    status, body, _ = await call(gw, "GET", "/admin/reliability/reports/reliability?since=soon")
    assert (status, body["error"]["param"]) == (400, "since")
    status, _, _ = await call(gw, "GET", "/admin/reliability/reports/reliability", token=None)
    assert status == 401


async def test_fallbacks_are_recorded_for_the_report(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str, db: asyncpg.Connection) -> None:
    """A failover answer is written (in the background) to fallback_events with its kind,
    model and provider, and the reliability report counts it."""
    gw, alpha, _ = await make(sim, gateway, pg_clean)
    await alpha.script(then={"status": 503})
    assert await chat(gw) == (200, "beta")

    async def recorded() -> list[asyncpg.Record]:
        return await db.fetch("select kind, model, provider from fallback_events")
    rows = await until(recorded, what="the fallback row")
    assert [tuple(r) for r in rows] == [("failover", "default", "beta")]
    status, body, _ = await call(gw, "GET", "/admin/reliability/reports/reliability?since=1h")
    assert (status, body["fallbacks_by_kind"]) == (200, {"failover": 1})


async def test_socket_chats_spend_from_the_keys_limits(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """Each chat on a WebSocket spends from its key's requests per minute, as an HTTP request
    does: with 3 a minute, the upgrade and two chats pass; the third is refused with
    rate_limit_exceeded and never acknowledged."""
    gw, _, _ = await make(sim, gateway, pg_clean)
    status, created, _ = await call(gw, "POST", "/admin/keys", json={"name": "ws", "rpm": 3})
    assert status == 201
    await eventually(lambda: bool(gw.app[VIEW].fleet_value(f"clientkey/{created['id']}")))
    frames: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as s, s.ws_connect(
            gw.server.make_url("/v1/ws"),
            headers={"Authorization": f"Bearer {created['key']}"}) as ws:
        for i in range(3):
            await ws.send_json({"type": "chat", "id": f"c{i}",
                                "request": {"model": "default", "messages": MSG}})
            while True:
                frame = await ws.receive_json(timeout=10)
                frames.append(frame)
                if frame["type"] in ("done", "error"):
                    break
    ends = {(f["id"], f["type"]) for f in frames if f["type"] in ("done", "error")}
    assert ends == {("c0", "done"), ("c1", "done"), ("c2", "error")}
    refused = next(f for f in frames if f["type"] == "error")
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert ("c2", "ack") not in {(f.get("id"), f["type"]) for f in frames}
