"""The chat path end to end: the official openai SDK → the gateway → simulators on sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from bulwark.config import Settings
from bulwark.providers.base import StreamEvent
from bulwark.wire import Chunk, ChunkChoice, Delta, encoder
from service.keys import ROUTER
from tests.conftest import GatewayFactory, Sim, SimFactory, provider

MSG: Any = [{"role": "user", "content": "Hi"}]
HUGE: Any = [{"role": "user", "content": "x" * (1 << 20)}]


async def three(sim: SimFactory, gateway: GatewayFactory, **p1: Any) -> tuple[list[Sim], Any]:
    sims = [await sim("alpha"), await sim("beta"), await sim("gamma")]
    providers = [provider(s.name, s.url, priority=i + 1, **(p1 if i == 0 else {}))
                 for i, s in enumerate(sims)]
    gw = await gateway(providers)
    return sims, gw


async def test_plain_chat_answers_with_headers(sim: SimFactory, gateway: GatewayFactory) -> None:
    """A plain chat is answered by the first provider, with the x-bulwark-* headers."""
    _, gw = await three(sim, gateway)
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default", messages=MSG)
    completion = raw.parse()
    assert "alpha" in (completion.choices[0].message.content or "")
    assert completion.choices[0].finish_reason == "stop"
    assert raw.headers["x-bulwark-provider"] == "alpha"
    assert raw.headers["x-bulwark-attempts"] == "1"
    assert raw.headers["x-bulwark-fallback"] == "none"
    assert raw.headers["x-request-id"].startswith("req_")


async def test_request_id_is_echoed(sim: SimFactory, gateway: GatewayFactory) -> None:
    """A client's own x-request-id comes back unchanged."""
    _, gw = await three(sim, gateway)
    async with aiohttp.ClientSession() as s, s.post(
        f"{gw.base_url}/chat/completions", json={"model": "default", "messages": MSG},
        headers={"x-request-id": "abc-123"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "abc-123"


async def test_stream_is_openai_chunks_with_usage(sim: SimFactory, gateway: GatewayFactory) -> None:
    """A stream arrives as chunks ending with finish_reason, then usage when asked, then [DONE]."""
    _, gw = await three(sim, gateway)
    async with gw.client() as client:
        stream = await client.chat.completions.create(
            model="default", messages=MSG, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from sim alpha")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert len({c.id for c in chunks}) == 1


async def test_stream_ends_with_done_on_the_wire(sim: SimFactory, gateway: GatewayFactory) -> None:
    """The raw SSE body ends with `data: [DONE]` and carries the provider headers."""
    _, gw = await three(sim, gateway)
    async with aiohttp.ClientSession() as s, s.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "default", "messages": MSG, "stream": True},
    ) as resp:
        body = await resp.read()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-bulwark-provider"] == "alpha"
    assert body.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in body  # not asked for


@pytest.mark.parametrize("step", [
    {"status": 530}, {"status": 503}, {"fault": "reset"}, {"status": 429, "retry_after": 30},
    {"fault": "malformed"}, {"status": 500}, {"fault": "truncate"},
], ids=["530", "503", "reset", "429", "malformed", "500", "truncate"])
async def test_failover_hides_provider_failure(sim: SimFactory, gateway: GatewayFactory,
                                               step: dict[str, Any]) -> None:
    """When provider 1 fails, the user gets provider 2's answer, marked as a failover."""
    sims, gw = await three(sim, gateway, retries=0)
    await sims[0].script(then=step)
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default", messages=MSG)
    assert "beta" in (raw.parse().choices[0].message.content or "")
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert raw.headers["x-bulwark-fallback"] == "failover"
    assert raw.headers["x-bulwark-attempts"] == "2"


@pytest.mark.parametrize("step", [{"status": 530}, {"fault": "reset"}, {"status": 429},
                                  {"status": 503}, {"fault": "stall-before"}],
                         ids=["530", "reset", "429", "503", "stall-before"])
async def test_stream_failover_before_first_token(sim: SimFactory, gateway: GatewayFactory,
                                                  step: dict[str, Any]) -> None:
    """A stream whose provider fails before its first token is served by the next, invisibly."""
    sims, gw = await three(sim, gateway, retries=0, timeout_first_token_sec=0.5,
                           timeout_idle_sec=0.5)
    await sims[0].script(then=step)
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text.startswith("Hello from sim beta")
    assert raw.headers["x-bulwark-fallback"] == "failover"


async def test_retry_same_provider_on_transient_error(sim: SimFactory,
                                                      gateway: GatewayFactory) -> None:
    """A 503 then success on the same provider is retried there (retries=2), not failed over."""
    sims, gw = await three(sim, gateway, retries=2)
    await sims[0].script(steps=[{"status": 503}])
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default", messages=MSG)
    assert raw.headers["x-bulwark-provider"] == "alpha"
    assert raw.headers["x-bulwark-attempts"] == "2"
    assert (await sims[0].stats())["chat"] == 2


async def test_all_fail_is_a_clean_503(sim: SimFactory, gateway: GatewayFactory) -> None:
    """Every provider failing gives an OpenAI-shaped 503: Retry-After, x-should-retry: false,
    and no upstream text."""
    sims, gw = await three(sim, gateway)
    for s in sims:
        await s.script(then={"status": 530})
    async with gw.client() as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="default", messages=MSG)
    resp = info.value.response
    assert resp.status_code == 503
    assert resp.headers["x-should-retry"] == "false"
    assert int(resp.headers["retry-after"]) >= 1
    body = resp.text
    assert "530" not in body and "html" not in body.lower() and "cloudflare" not in body.lower()
    err = resp.json()["error"]
    assert err["type"] == "api_error" and err["code"] == "no_provider_available"
    assert set(err) == {"message", "type", "code", "param"}


async def test_all_rate_limited_is_429_with_smallest_retry_after(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """When every provider says 429, the client gets 429 with the smallest Retry-After."""
    sims, gw = await three(sim, gateway)
    for s, wait in zip(sims, (7, 3, 9), strict=True):
        await s.script(then={"status": 429, "retry_after": wait})
    async with gw.client() as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="default", messages=MSG)
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.response.headers["x-should-retry"] == "false"


async def test_rate_limited_provider_is_skipped_until_retry_after(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """After a 429 with Retry-After, the provider gets no request until the delay passes."""
    sims, gw = await three(sim, gateway, retries=0)
    await sims[0].script(steps=[{"status": 429, "retry_after": 30}])
    async with gw.client() as client:
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(
                model="default", messages=MSG)
            assert raw.headers["x-bulwark-provider"] == "beta"
    assert (await sims[0].stats())["chat"] == 1


async def test_stream_stall_after_tokens_makes_sdk_raise(sim: SimFactory,
                                                         gateway: GatewayFactory) -> None:
    """A provider stalling mid-stream ends the stream with an error event: the SDK raises,
    and no second provider's tokens are mixed in."""
    sims, gw = await three(sim, gateway, timeout_idle_sec=0.3)
    await sims[0].script(then={"fault": "stall"})
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="default", messages=MSG, stream=True)
        got: list[str] = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                if chunk.choices:
                    got.append(chunk.choices[0].delta.content or "")
    assert "".join(got).startswith("Hello from sim alpha")
    assert "beta" not in "".join(got)
    assert "stalled" in str(info.value.message) or "stopped" in str(info.value.message)
    assert (await sims[1].stats())["chat"] == 0


@pytest.mark.parametrize("fault", ["truncate", "error-event", "malformed"])
async def test_stream_broken_after_tokens_is_an_error_event(
        sim: SimFactory, gateway: GatewayFactory, fault: str) -> None:
    """A stream cut after its first tokens never ends cleanly: the SDK raises."""
    sims, gw = await three(sim, gateway)
    await sims[0].script(then={"fault": fault})
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="default", messages=MSG, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass


async def test_slow_first_token_is_replaced_before_any_byte(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """A provider slower to its first token than timeout_first_token_sec is replaced."""
    sims, gw = await three(sim, gateway, timeout_first_token_sec=0.3)
    await sims[0].script(then={"first_token_ms": 3000})
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert text.startswith("Hello from sim beta")


async def test_failing_provider_stops_receiving_requests(sim: SimFactory,
                                                         gateway: GatewayFactory) -> None:
    """A provider that keeps failing trips its breaker and then gets no more requests."""
    sims, gw = await three(sim, gateway, retries=0)
    await sims[0].script(then={"status": 503})
    async with gw.client() as client:
        for _ in range(12):
            raw = await client.chat.completions.with_raw_response.create(
                model="default", messages=MSG)
            assert raw.headers["x-bulwark-provider"] == "beta"
    # CB_FAIL_THRESHOLD (5) consecutive failures open it; the rest go straight to beta.
    assert (await sims[0].stats())["chat"] == Settings().cb_fail_threshold
    async with gw.client() as client:
        last = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG)
    assert last.headers["x-bulwark-attempts"] == "1"


async def test_attempts_are_capped(sim: SimFactory, gateway: GatewayFactory) -> None:
    """Retries × failover never exceed the attempt cap, counted at the upstreams."""
    sims, gw_factory = [await sim(f"s{i}") for i in range(4)], gateway
    gw = await gw_factory([provider(s.name, s.url, priority=i, retries=2)
                           for i, s in enumerate(sims)],
                          settings=Settings(http_backoff_base_ms=0, max_attempts=5))
    for s in sims:
        await s.script(then={"status": 502})
    async with gw.client() as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="default", messages=MSG)
    total = sum([(await s.stats())["chat"] for s in sims])
    assert total == 5


async def test_bad_request_from_upstream_is_not_failed_over(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """An upstream 400 is the caller's error: 400 to the client, no failover, no breaker."""
    sims, gw = await three(sim, gateway)
    await sims[0].script(then={"status": 400})
    async with gw.client() as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="default", messages=MSG)
    assert (await sims[1].stats())["chat"] == 0


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "default"}, 400, "messages"),
    ({"model": "default", "messages": []}, 400, "messages"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ({"model": "default", "messages": MSG, "temperature": 7}, 400, "temperature"),
    ({"model": "default", "messages": MSG, "tempurature": 1}, 400, "tempurature"),
    ({"model": "nope", "messages": MSG}, 404, "model"),
])
async def test_bad_input_is_an_openai_error(sim: SimFactory, gateway: GatewayFactory,
                                            body: dict[str, Any], status: int,
                                            param: str) -> None:
    """Invalid requests get 400/404 in OpenAI's error shape, naming the parameter."""
    _, gw = await three(sim, gateway)
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw.base_url}/chat/completions", json=body) as resp:
        assert resp.status == status
        err = (await resp.json())["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    if status == 404:
        assert err["code"] == "model_not_found"


async def test_not_json_is_400(sim: SimFactory, gateway: GatewayFactory) -> None:
    """A body that is not JSON is a 400 invalid_json."""
    _, gw = await three(sim, gateway)
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw.base_url}/chat/completions", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"


async def test_sdk_exception_classes(sim: SimFactory, gateway: GatewayFactory) -> None:
    """The SDK maps our statuses to its own classes: 404, 400, 413."""
    _, gw = await three(sim, gateway)
    async with gw.client() as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="unknown", messages=MSG)
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="default", messages=[])
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="default", messages=HUGE)
        assert info.value.status_code == 413


async def test_too_many_messages_and_too_long(sim: SimFactory, gateway: GatewayFactory) -> None:
    """Bounds on message count and message length are 400s naming the parameter."""
    sims = [await sim("alpha")]
    gw = await gateway([provider("alpha", sims[0].url)],
                       settings=Settings(max_messages=3, max_message_chars=10))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.base_url}/chat/completions",
                          json={"model": "default", "messages": MSG * 4}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "messages"
        async with s.post(f"{gw.base_url}/chat/completions",
                          json={"model": "default",
                                "messages": [{"role": "user", "content": "x" * 11}]}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "messages[0].content"


async def test_models_lists_gateway_names(sim: SimFactory, gateway: GatewayFactory) -> None:
    """GET /v1/models lists the gateway's model names, through the SDK."""
    s = await sim("alpha")
    gw = await gateway([provider("alpha", s.url, models={"default": "sim-1", "fast": "sim-1"})])
    async with gw.client() as client:
        models = [m.id async for m in client.models.list()]
    assert models == ["default", "fast"]


async def test_unknown_path_is_openai_404(sim: SimFactory, gateway: GatewayFactory) -> None:
    """Unknown paths answer OpenAI-shaped JSON with a request id."""
    _, gw = await three(sim, gateway)
    async with aiohttp.ClientSession() as s, s.get(f"{gw.base_url}/nothing") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
        assert resp.headers["x-request-id"]


async def test_wrong_method_is_openai_405(sim: SimFactory, gateway: GatewayFactory) -> None:
    """A known path with a method it does not take: 405 JSON, `Allow`, a request id, and on
    the chat path the degradation level like every other chat response."""
    _, gw = await three(sim, gateway)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.base_url}/chat/completions") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
            assert resp.headers["Allow"] == "POST"
            assert resp.headers["x-request-id"]
            assert resp.headers["x-bulwark-degradation"] == "normal"
        async with s.delete(f"{gw.base_url.removesuffix('/v1')}/health/live") as resp:
            assert resp.status == 405
            assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
        async with s.post(f"{gw.base_url}/nothing/here") as resp:
            assert resp.status == 404


async def test_long_retry_after_on_5xx_fails_over_at_once(sim: SimFactory,
                                                          gateway: GatewayFactory) -> None:
    """A 503 with Retry-After: 60 is not waited out on the same provider: failover now."""
    sims, gw = await three(sim, gateway, retries=2)
    await sims[0].script(then={"status": 503, "retry_after": 60})
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default", messages=MSG)
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert (await sims[0].stats())["chat"] == 1


async def test_client_leaving_before_first_token_is_not_an_error(
        sim: SimFactory, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    """A client that hangs up while the gateway waits for the first token costs nothing:
    no unhandled error, no failover, and the next request is served normally."""
    sims, gw = await three(sim, gateway)
    await sims[0].script(steps=[{"first_token_ms": 300}])
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TimeoutError):
            async with s.post(f"{gw.base_url}/chat/completions",
                              json={"model": "default", "messages": MSG, "stream": True},
                              timeout=aiohttp.ClientTimeout(total=0.1)) as resp:
                await resp.read()
    await asyncio.sleep(0.4)  # let the gateway reach its first write to the closed socket
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default", messages=MSG)
    assert raw.headers["x-bulwark-provider"] == "alpha"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert (await sims[1].stats())["chat"] == 0


class _BuggyAdapter:
    """An adapter with a bug of ours: one content chunk, then an unexpected exception."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    async def stream(self, call: Any) -> Any:
        chunk = Chunk(id="c1", created=1, model="m",
                      choices=[ChunkChoice(delta=Delta(role="assistant", content="Hi"))])
        yield StreamEvent(encoder.encode(chunk), chunk)
        raise RuntimeError("a bug")


async def test_a_bug_mid_stream_still_ends_with_an_error_event(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """Even an unexpected exception after the first byte ends the stream with an error
    event (the SDK raises), never with a clean cut that reads as a complete answer."""
    _, gw = await three(sim, gateway)
    rt = gw.app[ROUTER].runtimes["alpha"]
    rt.adapter = _BuggyAdapter(rt.provider)
    async with gw.client() as client:
        stream = await client.chat.completions.create(model="default", messages=MSG, stream=True)
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                pass
    assert "failed in the middle" in info.value.message
    assert rt.breaker.snapshot()["half_open_in_flight"] == 0


async def test_whole_answer_past_its_total_timeout_fails_over(sim: SimFactory,
                                                             gateway: GatewayFactory) -> None:
    """A provider that never answers a non-streaming request is given up on at its total
    timeout (the shared deadline timer, bulwark/deadline.py) and the next one answers; the
    idle timeout, a stream's, does not cut a whole answer short."""
    sims, gw = await three(sim, gateway, retries=0, timeout_total_sec=0.4,
                           timeout_idle_sec=0.1)
    await sims[0].script(then={"fault": "stall-before"})
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default",
                                                                     messages=MSG)
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert raw.headers["x-bulwark-fallback"] == "failover"
    assert (await sims[0].stats())["chat"] == 1


async def test_whole_answer_may_take_longer_than_the_idle_timeout(sim: SimFactory,
                                                                 gateway: GatewayFactory) -> None:
    """A non-streaming answer that takes longer than `timeout_idle_sec` (a stream's limit
    between chunks) but less than the total timeout is the first provider's answer."""
    sims, gw = await three(sim, gateway, retries=0, timeout_total_sec=3.0,
                           timeout_idle_sec=0.1)
    await sims[0].script(then={"latency_ms": 300})
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default",
                                                                     messages=MSG)
    assert raw.headers["x-bulwark-provider"] == "alpha"
    assert raw.headers["x-bulwark-fallback"] == "none"
