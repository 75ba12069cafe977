"""Bulkheads: the per-process cap on client requests and the per-provider cap on upstream
requests refuse (or fail over) after a short bounded wait; health stays answered."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from bulwark.config import Settings
from service.bulkhead import Bulkhead
from tests.conftest import Gateway, GatewayFactory, SimFactory, provider
from tests.procs import until

MSG: Any = [{"role": "user", "content": "Hi"}]


async def post(gw: Gateway) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw.base_url}/chat/completions", json={"model": "default", "messages": MSG}) as r:
        return r.status, dict(r.headers), await r.json()


async def test_a_freed_slot_goes_to_the_first_waiter_and_waits_are_bounded() -> None:
    """Slots are handed to waiters in arrival order; a waiter past the wait is refused."""
    bh = Bulkhead(1, wait_sec=5.0)
    assert bh.try_enter() and not bh.try_enter()
    order: list[int] = []

    async def waiter(i: int) -> None:
        assert await bh.wait()
        order.append(i)
        bh.leave()

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    bh.leave()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and bh.in_flight == 0
    assert bh.try_enter()
    assert not await bh.wait(0.01)
    bh.leave()
    assert bh.in_flight == 0


async def test_process_bulkhead_refuses_beyond_its_cap_and_livez_stays_up(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """With BULWARK_MAX_IN_FLIGHT=2 and slow answers, four at once: two answered, two
    refused with 503 server_overloaded and Retry-After; /health/live answers meanwhile."""
    alpha = await sim("alpha")
    await alpha.script(then={"latency_ms": 600})
    gw = await gateway([provider("alpha", alpha.url)],
                       settings=Settings(http_backoff_base_ms=0, max_in_flight=2,
                                         bulkhead_wait_ms=50))
    calls = [asyncio.create_task(post(gw)) for _ in range(4)]

    async def busy() -> bool:
        return (await alpha.stats())["chat"] >= 2
    await until(busy, what="two requests upstream")
    async with aiohttp.ClientSession() as s, s.get(gw.server.make_url("/health/live")) as r:
        assert r.status == 200
    results = await asyncio.gather(*calls)
    assert sorted(status for status, _, _ in results) == [200, 200, 503, 503]
    for status, headers, body in results:
        if status == 503:
            assert body["error"]["code"] == "server_overloaded"
            assert headers["Retry-After"] == "1"
    assert (await alpha.stats())["chat"] == 2


async def test_provider_bulkhead_fails_over_then_refuses(sim: SimFactory,
                                                         gateway: GatewayFactory) -> None:
    """A provider at its max_in_flight is passed over for the next one; when every
    provider is full, the request waits briefly and gets 503 provider_capacity."""
    alpha, beta = await sim("alpha"), await sim("beta")
    for s in (alpha, beta):
        await s.script(then={"latency_ms": 600})
    settings = Settings(http_backoff_base_ms=0, bulkhead_wait_ms=50)
    gw = await gateway([provider("alpha", alpha.url, priority=1, max_in_flight=1),
                        provider("beta", beta.url, priority=2, max_in_flight=1)],
                       settings=settings)
    results = await asyncio.gather(*(post(gw) for _ in range(3)))
    served = sorted(h.get("x-bulwark-provider", "") for status, h, _ in results if status == 200)
    assert served == ["alpha", "beta"]
    refused = [(h, b) for status, h, b in results if status != 200]
    assert len(refused) == 1
    headers, body = refused[0]
    assert body["error"]["code"] == "provider_capacity"
    assert headers["Retry-After"] == "1"
    assert (await alpha.stats())["chat"] == 1 and (await beta.stats())["chat"] == 1
