"""`/health/live` on its own port, answered by a thread: it answers while the event loop is
busy, and says "fail" once the loop has stopped turning."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from bulwark.config import Settings
from service.liveness import liveness_ctx
from tests.conftest import GatewayFactory, SimFactory, provider
from tests.procs import free_port


def get(port: int, path: str = "/health/live") -> tuple[int, str, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", json.loads(resp.read())
    finally:
        conn.close()


async def test_the_gateway_answers_liveness_on_its_health_port(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """With BULWARK_HEALTH_PORT the gateway answers /health/live there (health+json);
    any other path there is a 404."""
    port = free_port()
    alpha = await sim("alpha")
    await gateway([provider("alpha", alpha.url)],
                  settings=Settings(http_backoff_base_ms=0, health_port=port))
    status, ctype, body = await asyncio.to_thread(get, port)
    assert (status, ctype, body) == (200, "application/health+json", {"status": "pass"})
    status, _, _ = await asyncio.to_thread(get, port, "/v1/models")
    assert status == 404


async def test_a_stuck_event_loop_fails_the_probe() -> None:
    """The thread answers even while the loop is blocked, and answers 503 once the loop's
    heartbeat is older than the bound: a stuck process is restarted, a busy one is not."""
    port = free_port()
    ctx = liveness_ctx("127.0.0.1", port, stale_after=0.2)(web.Application())
    assert isinstance(ctx, AsyncGenerator)
    await ctx.__anext__()
    try:
        assert (await asyncio.to_thread(get, port))[0] == 200
        seen: list[tuple[int, str, dict[str, Any]]] = []

        def probe_later() -> None:
            time.sleep(0.7)
            seen.append(get(port))

        prober = threading.Thread(target=probe_later)
        prober.start()
        time.sleep(1.0)
        prober.join()
        status, _, body = seen[0]
        assert status == 503 and body["status"] == "fail"
        await asyncio.sleep(0.3)  # the loop turns again: its heartbeat is fresh
        assert (await asyncio.to_thread(get, port))[0] == 200
    finally:
        await ctx.aclose()
