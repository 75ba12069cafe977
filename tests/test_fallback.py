"""When nothing can answer now: fallback models, stored answers, the canned reply, a job —
the openai SDK → gateways → simulators on sockets, with a real Postgres for the cache."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from bulwark.config import ModelPolicy, Settings
from bulwark.errors import ServiceUnavailable
from bulwark.sim import reply_text
from bulwark.wire import ChatRequest, Message
from service.dispatch import QueueInstead, Request
from service.keys import CACHE, DISPATCHER
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider
from tests.procs import until

MSG: Any = [{"role": "user", "content": "What is the capital of France?"}]
CANNED = "Our assistant is briefly unavailable. Your message is saved; please try again."
DOWN = {"status": 503}


def policies(**default: Any) -> dict[str, ModelPolicy]:
    return {"default": ModelPolicy(**default), "small": ModelPolicy()}


async def fleet(sim: SimFactory) -> list[Sim]:
    """alpha and beta serve `default`; gamma serves `small` (the fallback model)."""
    return [await sim("alpha"), await sim("beta"), await sim("gamma")]


def providers_of(sims: list[Sim], **overrides: Any) -> list[Any]:
    alpha, beta, gamma = sims
    return [provider("alpha", alpha.url, priority=1, **overrides),
            provider("beta", beta.url, priority=2, **overrides),
            provider("gamma", gamma.url, priority=3, models={"small": "sim-1-mini"},
                     **overrides)]


async def start(gateway: GatewayFactory, sims: list[Sim], dsn: str | None = None, *,
                max_attempts: int = 6, **default: Any) -> Gateway:
    settings = Settings(http_backoff_base_ms=0, database_url=dsn, max_attempts=max_attempts)
    # One try per provider: the attempt cap is shared with the fallback chain, and two
    # providers retried twice each would spend all six attempts before `small`.
    return await gateway(providers_of(sims, retries=0), settings=settings,
                         models=policies(**default))


async def down(*sims: Sim) -> None:
    for s in sims:
        await s.script(then=DOWN)


async def rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("select key, model, body, size from response_cache"))
    finally:
        await conn.close()


async def stored(gw: Gateway, dsn: str, n: int = 1) -> None:
    """The writer has put n answers into Postgres (flushed now rather than waited for)."""
    await gw.app[CACHE].flush()

    async def probe() -> bool:
        return len(await rows(dsn)) >= n
    await until(probe, what="stored answer in Postgres")


async def chat_raw(gw: Gateway, headers: dict[str, str] | None = None,
                   **body: Any) -> tuple[int, dict[str, str], bytes]:
    payload = {"model": "default", "messages": MSG, **body}
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw.base_url}/chat/completions", json=payload, headers=headers or {}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ---- fallback models -------------------------------------------------------------------


async def test_fallback_model_answers_when_every_provider_is_down(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """Every provider of `default` failing: `small` answers, says so in the header and in the
    answer's model field."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, fallback_models=["small"])
    await down(sims[0], sims[1])
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default",
                                                                     messages=MSG)
    completion = raw.parse()
    assert raw.headers["x-bulwark-fallback"] == "model"
    assert raw.headers["x-bulwark-provider"] == "gamma"
    assert completion.model == "small"
    assert completion.choices[0].message.content == reply_text("gamma")


async def test_fallback_model_streams(sim: SimFactory, gateway: GatewayFactory) -> None:
    """A stream from the fallback model: every chunk names `small`, and it ends properly."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, fallback_models=["small"])
    await down(sims[0], sims[1])
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, stream=True)
        assert raw.headers["x-bulwark-fallback"] == "model"
        chunks = [c async for c in raw.parse()]
    assert {c.model for c in chunks} == {"small"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        reply_text("gamma")
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_context_length_moves_on_to_the_fallback_model(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """A request too long for `default` (413 context length at its providers) is answered by
    `small`; without a fallback model it stays the caller's 400."""
    sims = await fleet(sim)
    for s in sims[:2]:
        await s.script(then={"status": 413})
    gw = await start(gateway, sims, fallback_models=["small"])
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default",
                                                                     messages=MSG)
    assert raw.headers["x-bulwark-fallback"] == "model"
    assert raw.parse().model == "small"
    plain = await start(gateway, sims)
    status, _, body = await chat_raw(plain)
    assert status == 400 and b"context_length_exceeded" in body


async def test_fallback_chain_shares_the_attempt_cap(sim: SimFactory,
                                                     gateway: GatewayFactory) -> None:
    """Attempts spent on the first model count against the same cap: with a cap of 2, two
    failed providers leave none for the fallback model."""
    sims = await fleet(sim)
    await down(sims[0], sims[1])
    settings = Settings(http_backoff_base_ms=0, max_attempts=2)
    gw = await gateway(providers_of(sims, retries=0), settings=settings,
                       models=policies(fallback_models=["small"], cache="off"))
    status, _, _ = await chat_raw(gw)
    assert status == 503
    assert (await sims[2].stats())["chat"] == 0


# ---- the response cache ----------------------------------------------------------------


async def test_stored_answer_is_served_by_another_process_when_all_fail(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """One gateway answers and stores; another, sharing Postgres, serves that answer with
    `x-bulwark-fallback: cache` and its age once every provider is down."""
    sims = await fleet(sim)
    a = await start(gateway, sims, pg_clean)
    b = await start(gateway, sims, pg_clean)
    async with a.client() as client:
        first = await client.chat.completions.create(model="default", messages=MSG,
                                                     temperature=0.2)
    await stored(a, pg_clean)
    await down(sims[0], sims[1])
    async with b.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, temperature=0.2)
        again = raw.parse()
        # The same request with another temperature is another answer: none stored.
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="default", messages=MSG,
                                                 temperature=0.3)
    assert raw.headers["x-bulwark-fallback"] == "cache"
    assert int(raw.headers["x-bulwark-cache-age"]) >= 0
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.id == first.id
    assert b.app[CACHE].hits_db == 1


async def test_stored_stream_is_replayed_as_a_stream(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """A finished stream is stored as one answer; another process replays it as a proper
    stream (chunks, finish_reason, usage, [DONE]) and as JSON."""
    sims = await fleet(sim)
    a = await start(gateway, sims, pg_clean)
    b = await start(gateway, sims, pg_clean)
    async with a.client() as client:
        live = [c async for c in await client.chat.completions.create(
            model="default", messages=MSG, stream=True,
            stream_options={"include_usage": True})]
    text = "".join(c.choices[0].delta.content or "" for c in live if c.choices)
    await stored(a, pg_clean)
    await down(sims[0], sims[1])
    async with b.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, stream=True,
            stream_options={"include_usage": True})
        assert raw.headers["x-bulwark-fallback"] == "cache"
        assert "x-bulwark-cache-age" in raw.headers
        replayed = [c async for c in raw.parse()]
        whole = await client.chat.completions.create(model="default", messages=MSG)
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == text
    assert [c.choices[0].finish_reason for c in replayed if c.choices][-1] == "stop"
    assert replayed[-1].usage is not None and live[-1].usage is not None
    assert replayed[-1].usage.completion_tokens == live[-1].usage.completion_tokens
    assert whole.choices[0].message.content == text
    status, _, body = await chat_raw(b, stream=True)
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")


async def test_no_store_keeps_the_answer_out(sim: SimFactory, gateway: GatewayFactory,
                                              pg_clean: str) -> None:
    """`Cache-Control: no-store`: the answer is neither kept in memory nor written."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, pg_clean)
    status, _, _ = await chat_raw(gw, {"Cache-Control": "no-store"})
    assert status == 200
    await gw.app[CACHE].flush()
    assert await rows(pg_clean) == []
    await down(sims[0], sims[1])
    status, _, _ = await chat_raw(gw)
    assert status == 503


async def test_no_cache_refuses_a_stored_answer(sim: SimFactory, gateway: GatewayFactory,
                                                 pg_clean: str) -> None:
    """`Cache-Control: no-cache` gets today's 503 although an answer is stored."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, pg_clean)
    assert (await chat_raw(gw))[0] == 200
    await down(sims[0], sims[1])
    status, headers, _ = await chat_raw(gw, {"Cache-Control": "no-cache"})
    assert status == 503 and headers["x-should-retry"] == "false"
    status, headers, _ = await chat_raw(gw)
    assert status == 200 and headers["x-bulwark-fallback"] == "cache"


async def test_errors_and_broken_streams_are_never_stored(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """A failed request and a stream cut after its first tokens store nothing."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, pg_clean)
    await down(sims[0], sims[1])
    assert (await chat_raw(gw))[0] == 503
    for s in sims[:2]:
        await s.script(then={"fault": "truncate", "chunks": 6})
    async with gw.client() as client:
        with pytest.raises(openai.APIError):
            async for _ in await client.chat.completions.create(
                    model="default", messages=MSG, stream=True):
                pass
    await gw.app[CACHE].flush()
    assert gw.app[CACHE].stored == 0
    assert await rows(pg_clean) == []
    await down(sims[0], sims[1])
    assert (await chat_raw(gw, stream=True))[0] == 503


async def test_first_mode_serves_a_fresh_answer_without_asking(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """`cache = "first"`: a fresh stored answer is served before any provider (from memory,
    and in another process from Postgres); one older than cache_ttl_sec is not."""
    sims = await fleet(sim)
    a = await start(gateway, sims, pg_clean, cache="first", cache_ttl_sec=3600)
    b = await start(gateway, sims, pg_clean, cache="first", cache_ttl_sec=3600)
    assert (await chat_raw(a))[1]["x-bulwark-fallback"] == "none"
    status, headers, _ = await chat_raw(a)
    assert status == 200 and headers["x-bulwark-fallback"] == "cache"
    assert headers["x-bulwark-attempts"] == "0"
    await stored(a, pg_clean)
    status, headers, _ = await chat_raw(b, stream=True)
    assert status == 200 and headers["x-bulwark-fallback"] == "cache"
    assert (await sims[0].stats())["chat"] == 1
    # Stored two hours ago: too old for this model, so the provider answers again.
    conn = await asyncpg.connect(pg_clean)
    try:
        await conn.execute("update response_cache set created_at = now() - interval '2 hours'")
    finally:
        await conn.close()
    c = await start(gateway, sims, pg_clean, cache="first", cache_ttl_sec=3600)
    assert (await chat_raw(c))[1]["x-bulwark-fallback"] == "none"
    assert (await sims[0].stats())["chat"] == 2


async def test_answer_older_than_ttl_is_not_a_fallback(
        sim: SimFactory, gateway: GatewayFactory, pg_clean: str) -> None:
    """In fallback mode too, a stored answer past cache_ttl_sec is never served."""
    sims = await fleet(sim)
    a = await start(gateway, sims, pg_clean, cache_ttl_sec=60)
    assert (await chat_raw(a))[0] == 200
    await stored(a, pg_clean)
    conn = await asyncpg.connect(pg_clean)
    try:
        await conn.execute("update response_cache set created_at = now() - interval '2 minutes'")
    finally:
        await conn.close()
    await down(sims[0], sims[1])
    b = await start(gateway, sims, pg_clean, cache_ttl_sec=60)
    assert (await chat_raw(b))[0] == 503


async def test_cache_off_stores_nothing(sim: SimFactory, gateway: GatewayFactory) -> None:
    """`cache = "off"`: no answer is kept, so none can be served."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, cache="off")
    assert (await chat_raw(gw))[0] == 200
    assert gw.app[CACHE].stored == 0
    await down(sims[0], sims[1])
    assert (await chat_raw(gw))[0] == 503


# ---- the canned reply ------------------------------------------------------------------


async def test_canned_reply_only_for_a_client_that_accepts_it(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """Every provider down, nothing stored: the canned reply goes only to a client that sent
    `x-bulwark-accept-canned: true`, marked `bulwark-canned`, as JSON and as a stream."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, canned_reply=CANNED)
    await down(sims[0], sims[1])
    async with gw.client() as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="default", messages=MSG)
        assert err.value.status_code == 503
    async with gw.client(default_headers={"x-bulwark-accept-canned": "true"}) as client:
        raw = await client.chat.completions.with_raw_response.create(model="default",
                                                                     messages=MSG)
        reply = raw.parse()
        assert raw.headers["x-bulwark-fallback"] == "canned"
        assert reply.system_fingerprint == "bulwark-canned"
        assert reply.choices[0].message.content == CANNED
        stream = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, stream=True)
        assert stream.headers["x-bulwark-fallback"] == "canned"
        chunks = [c async for c in stream.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CANNED
    assert {c.system_fingerprint for c in chunks} == {"bulwark-canned"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert gw.app[CACHE].stored == 0  # a canned reply is not a model's answer to keep


async def test_order_cache_then_canned_then_queue(sim: SimFactory,
                                                  gateway: GatewayFactory) -> None:
    """A stored answer beats the canned reply; the canned reply (when accepted) beats a job;
    a client that accepts a job gets QueueInstead only when nothing else answers."""
    sims = await fleet(sim)
    gw = await start(gateway, sims, canned_reply=CANNED)
    dispatcher = gw.app[DISPATCHER]

    def request(text: str, **kw: Any) -> Request:
        chat = ChatRequest(model="default", messages=[Message(role="user", content=text)])
        return Request(chat=chat, request_id="t", deadline=1e12, passthrough={}, **kw)

    assert (await dispatcher.complete(request("kept"))).fallback == "none"
    await down(sims[0], sims[1])
    answer = await dispatcher.complete(request("kept", accept_canned=True, may_queue=True))
    assert answer.fallback == "cache" and answer.provider == "cache"
    answer = await dispatcher.complete(request("new", accept_canned=True, may_queue=True))
    assert answer.fallback == "canned"
    with pytest.raises(QueueInstead):
        await dispatcher.complete(request("new", may_queue=True))
    with pytest.raises(ServiceUnavailable):
        await dispatcher.complete(request("new"))
