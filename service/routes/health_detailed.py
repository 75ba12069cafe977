"""`GET /health/detailed`: everything an operator checks first, in one health+json body.

The IETF api-health-check shape, as `/health`: `status` (pass | warn | fail, the same as
`/health/ready`) and `checks` keyed "component:measurement", each a list of objects; per
provider ones carry `componentId` (the configured name) and `componentType: "provider"`.

- `provider:health`, `provider:breaker`: the shared health (healthd) and this process's
  breaker, each with the reason the gateway recorded.
- `provider:last_probe`: healthd's last probe (`health_samples`): latency, TTFT, result.
- `provider:ttft_p50` / `provider:ttft_p95`: time to first token of healthd's successful
  probes over the last five minutes, fleet-wide. Probes, not user streams: they are the
  same small request for every provider, so providers compare fairly whatever traffic each
  got. Null for a provider probed with `GET /models` (`health_check = "models"`, no token).
- `provider:errors_5m`: this process's classified failed attempts of the last five
  minutes, by class (an in-memory ring; `service_errors` has the fleet's).
- `postgres:reachable` (round trip of `select 1`, ms), `postgres:synced`,
  `bus:heartbeat_age` (seconds since the bus's listener last heard from Postgres: the
  view is at most this stale, plus NOTIFY delivery), `healthd:heartbeat_age`.

The Postgres reads here (history, ping) are bounded by short timeouts and never block the
answer: an unreachable database is reported, as a `warn`.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from bulwark.history import History
from bulwark.state import Health
from service.keys import PROVIDERS, RECENT_FAILURES, ROUTER, SETTINGS, STATUS, VIEW
from service.observers import MIX_WINDOW_SEC
from service.openapi import describe
from service.routes.health import _FAIL, _PASS_WARN, Status, _health, readiness
from service.status_board import DB_ERRORS

routes = web.RouteTableDef()

#: Bound on the Postgres round trip measured here; slower counts as unreachable.
PING_TIMEOUT_SEC = 1.0

Check = dict[str, Any]


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def provider_checks(app: web.Application, hist: History) -> dict[str, list[Check]]:
    router, view, recent = app[ROUTER], app[VIEW], app[RECENT_FAILURES]
    mix = recent.mix(MIX_WINDOW_SEC)
    checks: dict[str, list[Check]] = {
        "provider:health": [], "provider:breaker": [], "provider:last_probe": [],
        "provider:ttft_p50": [], "provider:ttft_p95": [], "provider:errors_5m": []}
    for p in app[PROVIDERS]:
        ident = {"componentId": p.name, "componentType": "provider"}
        row = view.rows.get(p.name)
        health = row.health if row is not None else Health.UNKNOWN
        checks["provider:health"].append({
            **ident, "observedValue": str(health),
            "status": {Health.UNHEALTHY: "fail", Health.DEGRADED: "warn"}.get(health, "pass"),
            "output": row.reason if row is not None else "no shared state yet"})
        rt = router.runtimes[p.name]
        snap = rt.breaker.snapshot()
        state = str(snap["state"])
        shared = row.breaker if row is not None else None
        checks["provider:breaker"].append({
            **ident, "observedValue": state,
            "status": {"open": "fail", "half_open": "warn"}.get(state, "pass"),
            "fleetValue": shared,
            "consecutiveFailures": snap["consecutive_failures"],
            "output": row.reason if row is not None and shared == state else ""})
        probes = hist.probes.get(p.name)
        last = probes[-1] if probes else None
        checks["provider:last_probe"].append({
            **ident, "observedValue": None if last is None else _round(last.latency_ms),
            "observedUnit": "ms", "time": None if last is None else _iso(last.at),
            "ttftMs": None if last is None else _round(last.ttft_ms),
            "status": "pass" if last is None or last.ok else "fail",
            **({"output": f"{last.error_class} (HTTP {last.status})"
                if last.status else str(last.error_class)}
               if last is not None and not last.ok else {})})
        stats = hist.stats.get(p.name)
        for key, value in (("provider:ttft_p50", stats.ttft_p50_ms if stats else None),
                           ("provider:ttft_p95", stats.ttft_p95_ms if stats else None)):
            checks[key].append({**ident, "observedValue": _round(value), "observedUnit": "ms",
                                "status": "pass"})
        errors = mix.get(p.name, {})
        checks["provider:errors_5m"].append({
            **ident, "observedValue": dict(sorted(errors.items())),
            "observedUnit": "failed attempts", "status": "warn" if errors else "pass"})
    return checks


@routes.get("/health/detailed")
@describe("Everything an operator checks first", tags=("health",),
          responses={200: _PASS_WARN, 503: _FAIL},
          description=("Readiness, Postgres, the bus, and per provider (`componentId`) its "
                       "health, breaker, last probe, TTFT and recent errors."))
async def detailed(request: web.Request) -> web.Response:
    app = request.app
    settings, view, board = app[SETTINGS], app[VIEW], app[STATUS]
    status, checks = readiness(app)
    db: dict[str, list[Check]] = {}
    if settings.database_url:
        try:
            ms = await board.ping(PING_TIMEOUT_SEC)
            db["postgres:reachable"] = [{"observedValue": round(ms, 2), "observedUnit": "ms",
                                         "status": "pass"}]
        except DB_ERRORS as err:
            db["postgres:reachable"] = [{"observedValue": None, "status": "warn",
                                         "output": f"unreachable ({type(err).__name__})"}]
            status = "warn" if status == "pass" else status
        heard = view.heard_age()
        db["bus:heartbeat_age"] = [{
            "observedValue": _round(heard, 3), "observedUnit": "s",
            "status": "pass" if view.synced else "warn",
            **({} if view.synced else {"output": "listener not synced: serving the last view"})}]
    hist = await board.history()
    all_checks = {**checks, **db, **provider_checks(app, hist)}
    final: Status = status
    return _health(final, all_checks, code=503 if final == "fail" else 200)
