"""The probe loop: one provider's schedule, against a real simulator."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from bulwark.providers.base import ProbeResult
from bulwark.providers.registry import make_adapter
from healthd.probe import JITTER, ProbeLoop, jittered
from tests.conftest import SimFactory, provider

#: Far longer than any test waits: a second probe can only come from a kick.
LONG = 60.0


class Recorder:
    """A probe handler that keeps what it was told."""

    def __init__(self) -> None:
        self.results: list[ProbeResult] = []
        self.tokens: list[int | None] = []
        self.changed = asyncio.Event()

    def before_probe(self, name: str) -> int | None:
        return len(self.results)

    async def after_probe(self, name: str, result: ProbeResult, token: int | None) -> None:
        self.results.append(result)
        self.tokens.append(token)
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        while len(self.results) < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)


class Exploding:
    """An adapter that breaks its promise never to raise."""

    def __init__(self) -> None:
        self.provider = provider("boom", "http://127.0.0.1:9/v1")

    async def probe(self, *, chat: bool, timeout: float) -> ProbeResult:
        raise RuntimeError("adapter bug")


def test_jitter_stays_within_ten_percent() -> None:
    """Periods vary by at most ±10% around the interval."""
    rng = random.Random(7)
    periods = [jittered(10.0, rng) for _ in range(1000)]
    assert min(periods) >= 10.0 * (1 - JITTER)
    assert max(periods) <= 10.0 * (1 + JITTER)
    assert len({round(p, 3) for p in periods}) > 100


async def test_probes_the_models_endpoint_and_kick_starts_the_next(sim: SimFactory) -> None:
    """A probe is a GET of /models whose outcome reaches the handler with its token; a kick
    starts the next probe without waiting out the period."""
    upstream = await sim("alpha")
    async with aiohttp.ClientSession() as session:
        adapter = make_adapter(provider("alpha", upstream.url), session, retry_after_cap=1.0)
        handler = Recorder()
        loop = ProbeLoop(adapter, interval=LONG, handler=handler, rng=random.Random(1))
        loop.kick()  # skip the initial spread too
        task = asyncio.create_task(loop.run())
        try:
            await handler.wait_for(1)
            await upstream.script(models_status=503)
            loop.kick()
            await handler.wait_for(2)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    first, second = handler.results
    assert first.ok
    assert (second.ok, second.status, second.error_class) == (False, 503, "server_error")
    assert handler.tokens == [0, 1]
    assert (await upstream.stats())["models"] == 2
    assert (await upstream.stats())["chat"] == 0


async def test_a_raising_adapter_counts_as_a_failed_probe() -> None:
    """An adapter bug is a failed probe, and the loop goes on."""
    handler = Recorder()
    loop = ProbeLoop(Exploding(), interval=LONG, handler=handler)  # type: ignore[arg-type]
    loop.kick()
    task = asyncio.create_task(loop.run())
    try:
        await handler.wait_for(1)
        loop.kick()
        await handler.wait_for(2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [r.ok for r in handler.results] == [False, False]
    assert handler.results[0].error_class == "probe_bug:RuntimeError"


@pytest.mark.parametrize(("interval", "total", "expected"), [(10.0, 30.0, 10.0),
                                                             (10.0, 4.0, 4.0)])
def test_probe_timeout_is_the_smaller_of_interval_and_budget(
    interval: float, total: float, expected: float,
) -> None:
    """A probe never outlives its period, nor the provider's own request budget."""
    adapter = Exploding()
    adapter.provider = provider("boom", "http://127.0.0.1:9/v1", timeout_total_sec=total)
    loop = ProbeLoop(adapter, interval=interval, handler=Recorder())  # type: ignore[arg-type]
    assert loop.timeout == expected
