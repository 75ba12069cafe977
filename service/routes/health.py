"""Health endpoints (k8s livez/readyz semantics, IETF api-health-check format)."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from bulwark.breaker import State
from bulwark.wire import encoder
from service.bodies import BreakerList, HealthBody
from service.keys import ROUTER, SETTINGS, VIEW
from service.openapi import Body, describe

routes = web.RouteTableDef()

Status = Literal["pass", "warn", "fail"]
HEALTH_JSON = "application/health+json"
_PASS_WARN = Body(HealthBody, media=HEALTH_JSON, description="pass or warn")
_FAIL = Body(HealthBody, media=HEALTH_JSON, description="fail: route traffic elsewhere")


def _health(status: Status, checks: dict[str, list[dict[str, object]]] | None = None,
            *, code: int | None = None) -> web.Response:
    body: dict[str, object] = {"status": status}
    if checks is not None:
        body["checks"] = checks
    return web.Response(status=code or (503 if status == "fail" else 200),
                        body=encoder.encode(body), content_type=HEALTH_JSON)


@routes.get("/health/live")
@describe("Liveness: restart me?", tags=("health",), responses={200: _PASS_WARN})
async def live(request: web.Request) -> web.Response:
    """Restart me? Only if this process cannot answer at all: no dependency is checked."""
    return _health("pass")


def readiness(app: web.Application) -> tuple[Status, dict[str, list[dict[str, object]]]]:
    router, view, settings = app[ROUTER], app[VIEW], app[SETTINGS]
    usable = [rt.name for rt in router.runtimes.values() if rt.breaker.state is not State.OPEN]
    checks: dict[str, list[dict[str, object]]] = {
        "providers:available": [{"observedValue": len(usable), "observedUnit": "providers",
                                 "status": "pass" if usable else "fail"}],
    }
    status: Status = "pass" if usable else "fail"
    if settings.database_url:
        age = view.healthd_age()
        fresh = view.healthd_fresh(settings.healthd_interval_sec)
        checks["healthd:heartbeat_age"] = [{
            "observedValue": None if age is None else round(age, 3), "observedUnit": "s",
            "status": "pass" if fresh else "warn",
            **({} if fresh else {"output": "healthd is stale: routing on local breakers"}),
        }]
        checks["postgres:synced"] = [{"observedValue": view.synced,
                                      "status": "pass" if view.synced else "warn"}]
        if status == "pass" and not (fresh and view.synced):
            status = "warn"
    return status, checks


@routes.get("/health/ready")
@describe("Readiness: route traffic here?", tags=("health",),
          responses={200: _PASS_WARN, 503: _FAIL})
async def ready(request: web.Request) -> web.Response:
    """Route traffic here? warn = serving on local state only; fail = nothing can answer."""
    status, checks = readiness(request.app)
    return _health(status, checks)


@routes.get("/health")
@describe("Health (as readiness)", tags=("health",), responses={200: _PASS_WARN, 503: _FAIL})
async def health(request: web.Request) -> web.Response:
    status, checks = readiness(request.app)
    return _health(status, checks)


@routes.get("/health/circuit-breakers")
@describe("This process's circuit breakers", tags=("health",),
          responses={200: BreakerList})
async def circuit_breakers(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    body = {name: rt.breaker.snapshot() for name, rt in sorted(router.runtimes.items())}
    return web.Response(body=encoder.encode({"breakers": body}), content_type="application/json")
