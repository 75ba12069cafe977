"""Per-key token buckets: the bucket maths on one process (fake clock), the shared buckets
in Postgres across two limiters (no overshoot), tokens charged after the answer, headers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg

from bulwark.errors import RateLimited
from service.ratelimit import Limiter, LocalStore, PgStore, _duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def start(limiter: Limiter) -> asyncio.Task[None]:
    return asyncio.create_task(limiter.run())


async def attempt(limiter: Limiter, key: str, rpm: int | None, tpm: int | None = None
                  ) -> dict[str, str] | RateLimited:
    try:
        return await limiter.admit(limiter.budget(key, rpm, tpm))
    except RateLimited as err:
        return err


async def test_a_fresh_key_spends_its_minute_at_once_then_refills_continuously() -> None:
    """Bucket of `rpm`, refilled at rpm/60 a second: 60 at once, the 61st is a 429 with
    Retry-After 1, and one more is admitted once a second has passed."""
    clock = Clock()
    limiter = Limiter(LocalStore(clock), clock=clock)
    task = await start(limiter)
    try:
        burst = await asyncio.gather(*(attempt(limiter, "k", 60) for _ in range(60)))
        assert all(isinstance(r, dict) for r in burst)
        refused = await attempt(limiter, "k", 60)
        assert isinstance(refused, RateLimited)
        assert refused.headers()["Retry-After"] == "1"
        assert refused.code == "rate_limit_exceeded" and refused.status == 429
        clock.now += 0.5
        assert isinstance(await attempt(limiter, "k", 60), RateLimited)
        clock.now += 0.5
        headers = await attempt(limiter, "k", 60)
        assert isinstance(headers, dict)
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1m0s"
        assert isinstance(await attempt(limiter, "k", 60), RateLimited)
        # Other keys have buckets of their own.
        assert isinstance(await attempt(limiter, "other", 60), dict)
    finally:
        task.cancel()


async def test_headers_of_a_fresh_key() -> None:
    """A key's first request reports its limit, what remains of the minute, and when the
    bucket is full again, in OpenAI's format."""
    clock = Clock()
    limiter = Limiter(LocalStore(clock), clock=clock)
    task = await start(limiter)
    try:
        headers = await attempt(limiter, "k", 600, 100_000)
        assert isinstance(headers, dict)
        assert headers["x-ratelimit-limit-requests"] == "600"
        assert headers["x-ratelimit-remaining-requests"] == "599"
        assert headers["x-ratelimit-reset-requests"] == "100ms"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(headers["x-ratelimit-remaining-tokens"]) == 100_000
    finally:
        task.cancel()
    assert [_duration(x) for x in (0.02, 1.5, 360.0)] == ["20ms", "1.5s", "6m0s"]


async def test_tokens_are_charged_after_the_answer_and_the_debt_is_paid() -> None:
    """Admission needs a positive token allowance; usage is charged afterwards, so a request
    may overdraw it, and the next waits until the bucket has paid the debt back."""
    clock = Clock()
    limiter = Limiter(LocalStore(clock), clock=clock)
    task = await start(limiter)
    try:
        b = limiter.budget("k", None, 120)  # 2 tokens a second
        await limiter.admit(b)
        limiter.charge(b, 80)
        await limiter.admit(b)  # 40 left: admitted
        limiter.charge(b, 80)  # 40 owed now
        refused = await attempt(limiter, "k", None, 120)
        assert isinstance(refused, RateLimited)
        assert "tokens" in refused.message
        assert refused.retry_after is not None and 20 <= refused.retry_after <= 21
        clock.now += 21  # 42 tokens refilled: the 40 owed, and 2 to spend
        assert isinstance(await attempt(limiter, "k", None, 120), dict)
    finally:
        task.cancel()


async def test_two_limiters_on_shared_buckets_admit_the_bucket_and_no_more(
        pg_clean: str) -> None:
    """Two processes' limiters leasing from one Postgres bucket: a simultaneous burst on
    both admits the bucket's size in total (plus what refilled meanwhile), never more."""
    pool = await asyncpg.create_pool(pg_clean, min_size=1, max_size=4)
    assert pool is not None

    async def fetch(sql: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await pool.fetch(sql, *args)]

    a, b = Limiter(PgStore(fetch)), Limiter(PgStore(fetch))
    tasks = [await start(a), await start(b)]
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        results = await asyncio.gather(*(attempt(lim, "shared", 30)
                                         for _ in range(40) for lim in (a, b)))
        elapsed = loop.time() - began
        admitted = sum(isinstance(r, dict) for r in results)
        assert 30 <= admitted <= 30 + elapsed * 0.5
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert refused and all(r.headers()["Retry-After"] for r in refused)
        level = await pool.fetchval(
            "select level from rate_buckets where key_id = 'shared' and dim = 'r'")
        assert level < 1
    finally:
        for t in tasks:
            t.cancel()
        await pool.close()


async def test_without_the_shared_store_each_limiter_serves_on_its_own() -> None:
    """When the shared buckets cannot be reached, a limiter keeps admitting from a bucket of
    its own (documented: N processes may then admit N times the limit)."""
    async def down(sql: str, args: Sequence[object]) -> None:
        return None

    limiter = Limiter(PgStore(down))
    task = await start(limiter)
    try:
        results = [await attempt(limiter, "k", 5) for _ in range(6)]
        assert [isinstance(r, dict) for r in results] == [True] * 5 + [False]
        assert limiter.lease_failures >= 1
    finally:
        task.cancel()
