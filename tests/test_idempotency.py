"""Idempotency-Key on chat and jobs against a real Postgres: the first result is replayed,
the upstream asked once (issue 6, item 7). Across processes: tests/test_jobs_cluster.py."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import SimFactory
from tests.jobsapi import CHAT, Start, api_factory
from tests.procs import until

KEY = {"Idempotency-Key": "order-42"}


@pytest.fixture
def api(aiohttp_server: Any, pg_clean: str) -> Start:
    return api_factory(aiohttp_server, pg_clean)


async def post(base: str, path: str, body: dict[str, Any],
               headers: dict[str, str]) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as s, s.post(f"{base}{path}", json=body,
                                                    headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


async def test_same_key_same_body_replays_without_a_second_call(
        api: Start, sim: SimFactory) -> None:
    """The second request with the key gets the first answer byte for byte, marked
    Idempotent-Replayed, and the provider is asked once; a request without a key is not
    affected."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    status, first, h1 = await post(gw.base, "/v1/chat/completions", CHAT, KEY)
    assert status == 200
    assert "Idempotent-Replayed" not in h1

    async def replayed() -> tuple[int, bytes, Any] | None:
        got = await post(gw.base, "/v1/chat/completions", CHAT, KEY)
        return got if got[0] != 409 else None  # the first one's response is being stored
    status, second, h2 = await until(replayed, what="replay")
    assert (status, second) == (200, first)
    assert h2["Idempotent-Replayed"] == "true"
    assert h2["x-bulwark-provider"] == "alpha"
    assert h2["Content-Type"].startswith("application/json")
    assert h2["x-request-id"] != h1["x-request-id"]
    assert (await alpha.stats())["chat"] == 1
    status, _, h3 = await post(gw.base, "/v1/chat/completions", CHAT, {})
    assert status == 200 and "Idempotent-Replayed" not in h3
    assert (await alpha.stats())["chat"] == 2


async def test_same_key_other_body_is_422(api: Start, sim: SimFactory) -> None:
    """Reusing a key with another body is a 422 idempotency_key_reused; nothing is sent."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    assert (await post(gw.base, "/v1/chat/completions", CHAT, KEY))[0] == 200
    other = {**CHAT, "temperature": 0.5}
    status, body, _ = await post(gw.base, "/v1/chat/completions", other, KEY)
    assert status == 422
    assert b'"code":"idempotency_key_reused"' in body
    assert (await alpha.stats())["chat"] == 1


async def test_key_in_flight_is_409_with_retry_after(api: Start, sim: SimFactory) -> None:
    """While the first request with a key runs, the same request gets 409
    idempotency_key_in_use with Retry-After, and no upstream call."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    await alpha.script(steps=[{"latency_ms": 1500}])
    first = asyncio.create_task(post(gw.base, "/v1/chat/completions", CHAT, KEY))
    await until(lambda: _busy(alpha), what="first in flight")
    status, body, headers = await post(gw.base, "/v1/chat/completions", CHAT, KEY)
    assert status == 409
    assert b'"code":"idempotency_key_in_use"' in body
    assert headers["Retry-After"] == "1"
    assert (await first)[0] == 200
    assert (await alpha.stats())["chat"] == 1


async def _busy(alpha: Any) -> bool:
    return bool((await alpha.stats())["chat"] >= 1)


async def test_bad_keys_are_400(api: Start, sim: SimFactory) -> None:
    """A key longer than 255 characters, empty, or not printable ASCII is a 400."""
    gw = await api([await sim("alpha")])
    for key in ("k" * 256, "", "tab\there"):
        status, body, _ = await post(gw.base, "/v1/chat/completions", CHAT,
                                     {"Idempotency-Key": key})
        assert status == 400, key
        assert b'"param":"Idempotency-Key"' in body
    status, _, _ = await post(gw.base, "/v1/chat/completions", CHAT,
                              {"Idempotency-Key": "k" * 255})
    assert status == 200


async def test_transient_failure_releases_the_key(api: Start, sim: SimFactory,
                                                  db: asyncpg.Connection) -> None:
    """A 503 is not stored: the key is released and the retry with it runs and answers."""
    alpha = await sim("alpha")
    gw = await api([alpha], breaker_threshold=100)
    await alpha.script(steps=[{"status": 503}])
    assert (await post(gw.base, "/v1/chat/completions", CHAT, KEY))[0] == 503
    await until(lambda: _no_key(db), what="key released")
    status, _, headers = await post(gw.base, "/v1/chat/completions", CHAT, KEY)
    assert status == 200 and "Idempotent-Replayed" not in headers
    assert (await alpha.stats())["chat"] == 2


async def _no_key(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("select count(*) = 0 from idempotency_keys"))


async def test_stream_with_a_key_is_replayed_as_the_same_stream(
        api: Start, sim: SimFactory) -> None:
    """A completed stream is stored as sent and replayed as an event stream, whole."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    body = {**CHAT, "stream": True}
    status, first, _ = await post(gw.base, "/v1/chat/completions", body, KEY)
    assert status == 200 and first.endswith(b"data: [DONE]\n\n")

    async def replayed() -> tuple[int, bytes, Any] | None:
        got = await post(gw.base, "/v1/chat/completions", body, KEY)
        return got if got[0] != 409 else None
    status, second, headers = await until(replayed, what="replay")
    assert (status, second) == (200, first)
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Idempotent-Replayed"] == "true"
    assert (await alpha.stats())["chat"] == 1


async def test_job_submission_with_a_key_is_one_job(api: Start, sim: SimFactory,
                                                    db: asyncpg.Connection) -> None:
    """POST /v1/chat/jobs twice with one key creates one job; the replay names it."""
    gw = await api([await sim("alpha")])
    job = {"request": CHAT}
    status, first, _ = await post(gw.base, "/v1/chat/jobs", job, KEY)
    assert status == 202

    async def replayed() -> tuple[int, bytes, Any] | None:
        got = await post(gw.base, "/v1/chat/jobs", job, KEY)
        return got if got[0] != 409 else None
    status, second, headers = await until(replayed, what="replay")
    assert (status, second, headers["Idempotent-Replayed"]) == (202, first, "true")
    assert headers["Location"].startswith("/v1/chat/jobs/job_")
    assert await db.fetchval("select count(*) from chat_jobs") == 1
    # The same key on the other endpoint is another request: 422.
    status, _, _ = await post(gw.base, "/v1/chat/completions", CHAT, KEY)
    assert status == 422
