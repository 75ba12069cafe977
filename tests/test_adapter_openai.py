"""OpenAIAdapter against a scripted upstream speaking OpenAI's real chat completions wire."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import msgspec
import pytest
from pytest_aiohttp import AiohttpServer

from bulwark.config import ProviderConfig, Settings, resolve
from bulwark.errors import ErrorClass, UpstreamError
from bulwark.providers.base import Call, StreamEvent
from bulwark.providers.openai import OpenAIAdapter
from bulwark.wire import ChatRequest, Chunk
from tests.scripted import Reply, Upstream, refused_url, sse_event, start_upstream

C = ErrorClass
KEY = "sk-proj-TESTKEYabcdefghijklmnopqrstuv"
ENV = {"OPENAI_API_KEY": KEY}

# A real gpt-4o answer, fields the gateway does not model included: they must survive.
COMPLETION = (
    b'{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion",'
    b'"created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"Hello! How can I help?","refusal":null,"annotations":[]},'
    b'"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,'
    b'"completion_tokens":7,"total_tokens":16,"prompt_tokens_details":{"cached_tokens":0,'
    b'"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}'
)


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
            "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}], "usage": None}


USAGE_CHUNK = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
               "model": "gpt-4o-mini", "choices": [],
               "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


def chunk_stream(*, finish: bool = True, usage: bool = False, done: bool = True) -> list[bytes]:
    events = [
        sse_event(chunk({"role": "assistant", "content": "", "refusal": None})),
        sse_event(chunk({"content": "Hel"})),
        sse_event(chunk({"content": "lo"})),
    ]
    if finish:
        events.append(sse_event(chunk({}, "stop")))
    if usage:
        events.append(sse_event(USAGE_CHUNK))
    if done:
        events.append(sse_event("[DONE]"))
    return events


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def adapter(url: str, session: aiohttp.ClientSession, *, cap: float = 10.0) -> OpenAIAdapter:
    cfg = ProviderConfig(name="openai", kind="openai", base_url=url,
                         api_key_env="OPENAI_API_KEY", models={"default": "gpt-4o-mini"})
    return OpenAIAdapter(resolve(cfg, Settings()), session, retry_after_cap=cap, env=ENV)


def make_call(**request: Any) -> Call:
    request.setdefault("messages", [{"role": "user", "content": "Hi"}])
    req = msgspec.convert({"model": "default", **request}, ChatRequest)
    return Call(request=req, upstream_model="gpt-4o-mini", request_id="req-1")


async def serve(aiohttp_server: AiohttpServer, *replies: Reply) -> Upstream:
    return await start_upstream(aiohttp_server, replies)


async def collect(events: AsyncIterator[StreamEvent]) -> list[Chunk]:
    return [e.chunk async for e in events]


async def failure(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession,
                  replies: Sequence[Reply], *, stream: bool = False,
                  cap: float = 10.0) -> UpstreamError:
    up = await start_upstream(aiohttp_server, replies)
    a = adapter(up.url(), session, cap=cap)
    with pytest.raises(UpstreamError) as info:
        if stream:
            await collect(a.stream(make_call(stream=True)))
        else:
            await a.complete(make_call())
    return info.value


async def test_request_body_and_headers(aiohttp_server: AiohttpServer,
                                        session: aiohttp.ClientSession) -> None:
    """The request goes out with the upstream model, Bearer key and no stream_options."""
    up = await serve(aiohttp_server, Reply(body=COMPLETION))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    await adapter(up.url(), session).complete(make_call(
        temperature=0.2, tools=tools, stream_options={"include_usage": True}))
    (rec,) = up.requests
    assert (rec.method, rec.path) == ("POST", "/v1/chat/completions")
    assert rec.headers["Authorization"] == f"Bearer {KEY}"
    assert rec.headers["X-Request-Id"] == "req-1"
    assert KEY not in rec.path + rec.query_string
    # stream=false is OpenAI's default, so it is left out like every other default.
    assert rec.json() == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}],
                          "temperature": 0.2, "tools": tools}


async def test_complete_passes_body_through(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """The upstream's own bytes are the client's body, unknown fields and all."""
    up = await serve(aiohttp_server, Reply(body=COMPLETION))
    done = await adapter(up.url(), session).complete(make_call())
    assert done.body == COMPLETION
    assert done.parsed.choices[0].message.content == "Hello! How can I help?"
    assert done.parsed.usage is not None
    assert done.parsed.usage.total_tokens == 16


async def test_complete_without_choices_is_malformed(aiohttp_server: AiohttpServer,
                                                     session: aiohttp.ClientSession) -> None:
    """A completion with no choices is MALFORMED_RESPONSE, not an empty answer."""
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": []}
    err = await failure(aiohttp_server, session, [Reply.json(body)])
    assert err.cls is C.MALFORMED_RESPONSE


async def test_stream_passes_chunks_and_stops_at_done(aiohttp_server: AiohttpServer,
                                                      session: aiohttp.ClientSession) -> None:
    """Chunks pass through as the upstream's bytes; [DONE] ends it, the usage chunk kept."""
    events = chunk_stream(usage=True)
    up = await serve(aiohttp_server, Reply(sse=events))
    call = make_call(stream=True, stream_options={"include_usage": True})
    got = [e async for e in adapter(up.url(), session).stream(call)]
    assert [b"data: " + e.raw + b"\n\n" for e in got] == events[:-1]
    assert "".join(e.chunk.choices[0].delta.content or "" for e in got if e.chunk.choices) == (
        "Hello")
    assert got[-2].chunk.finished
    assert got[-1].chunk.choices == []
    assert got[-1].chunk.usage is not None
    body = up.requests[0].json()
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stream_done_before_finish(aiohttp_server: AiohttpServer,
                                         session: aiohttp.ClientSession) -> None:
    """[DONE] before any finish_reason is a truncated answer: NETWORK_RESET."""
    err = await failure(aiohttp_server, session, [Reply(sse=chunk_stream(finish=False))],
                        stream=True)
    assert err.cls is C.NETWORK_RESET


async def test_stream_without_finish_reason(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """A clean close with no finish_reason and no [DONE] raises rather than truncates."""
    err = await failure(aiohttp_server, session,
                        [Reply(sse=chunk_stream(finish=False, done=False))], stream=True)
    assert err.cls is C.NETWORK_RESET
    assert "finish_reason" in err.detail


async def test_stream_error_event(aiohttp_server: AiohttpServer,
                                  session: aiohttp.ClientSession) -> None:
    """`data: {"error": …}` mid-stream raises a classified error after the chunks so far."""
    error = {"error": {"message": "The server had an error while processing your request.",
                       "type": "server_error", "param": None, "code": None}}
    up = await serve(aiohttp_server, Reply(sse=[*chunk_stream()[:2], sse_event(error)]))
    got: list[Chunk] = []
    with pytest.raises(UpstreamError) as info:
        async for e in adapter(up.url(), session).stream(make_call(stream=True)):
            got.append(e.chunk)
    assert info.value.cls is C.SERVER_ERROR
    assert len(got) == 2


async def test_stream_not_sse_is_malformed(aiohttp_server: AiohttpServer,
                                           session: aiohttp.ClientSession) -> None:
    """A stream request answered with a JSON body is MALFORMED_RESPONSE."""
    err = await failure(aiohttp_server, session, [Reply(body=COMPLETION)], stream=True)
    assert err.cls is C.MALFORMED_RESPONSE


async def test_stream_reset_midway(aiohttp_server: AiohttpServer,
                                   session: aiohttp.ClientSession) -> None:
    """A connection reset after some chunks is NETWORK_RESET."""
    err = await failure(aiohttp_server, session, [Reply(sse=chunk_stream()[:2], reset=True)],
                        stream=True)
    assert err.cls is C.NETWORK_RESET


async def test_429_retry_after(aiohttp_server: AiohttpServer,
                               session: aiohttp.ClientSession) -> None:
    """429 with Retry-After is RATE_LIMIT with the delay; retry-after-ms is preferred."""
    body = {"error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests",
                      "param": None, "code": "rate_limit_exceeded"}}
    err = await failure(aiohttp_server, session,
                        [Reply.json(body, status=429, headers={"Retry-After": "7"})], cap=60)
    assert (err.cls, err.retry_after) == (C.RATE_LIMIT, 7)
    err = await failure(aiohttp_server, session, [Reply.json(body, status=429, headers={
        "Retry-After": "7", "retry-after-ms": "1500"})], cap=60)
    assert err.retry_after == 1.5


async def test_401_hides_key(aiohttp_server: AiohttpServer,
                             session: aiohttp.ClientSession) -> None:
    """401 is AUTHENTICATION; OpenAI's 'Incorrect API key provided: sk-…' hint is redacted."""
    body = {"error": {"message": f"Incorrect API key provided: {KEY}. You can find your API "
                                 "key at https://platform.openai.com/account/api-keys.",
                      "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    err = await failure(aiohttp_server, session, [Reply.json(body, status=401)])
    assert err.cls is C.AUTHENTICATION
    assert KEY not in err.detail
    assert KEY not in str(err)


@pytest.mark.parametrize("status", [500, 503, 530])
async def test_5xx_is_server_error(aiohttp_server: AiohttpServer,
                                   session: aiohttp.ClientSession, status: int) -> None:
    """5xx, Cloudflare's 530 HTML page included, is SERVER_ERROR."""
    reply = Reply(status=status, headers={"Content-Type": "text/html"},
                  body=b"<html><head><title>Origin DNS error</title></head></html>")
    err = await failure(aiohttp_server, session, [reply])
    assert (err.cls, err.status) == (C.SERVER_ERROR, status)


async def test_malformed_json(aiohttp_server: AiohttpServer,
                              session: aiohttp.ClientSession) -> None:
    """Invalid JSON in a body or in a chunk is MALFORMED_RESPONSE, never forwarded."""
    err = await failure(aiohttp_server, session, [Reply(body=COMPLETION[:80])])
    assert err.cls is C.MALFORMED_RESPONSE
    err = await failure(aiohttp_server, session,
                        [Reply(sse=[*chunk_stream()[:1], sse_event(b"{\"id\": \"chatc")])],
                        stream=True)
    assert err.cls is C.MALFORMED_RESPONSE


async def test_connection_reset_and_refused(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """A reset before the answer is NETWORK_RESET; nothing listening is NETWORK_REFUSED."""
    err = await failure(aiohttp_server, session, [Reply(reset=True)])
    assert err.cls is C.NETWORK_RESET
    with pytest.raises(UpstreamError) as info:
        await adapter(refused_url(), session).complete(make_call())
    assert info.value.cls is C.NETWORK_REFUSED


async def test_probe(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    """GET /models is the probe; 401 and refused report their class, never raise."""
    models = {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model",
                                          "created": 1721172741, "owned_by": "system"}]}
    up = await serve(aiohttp_server, Reply.json(models),
                     Reply.json({"error": {"message": "bad key"}}, status=401))
    a = adapter(up.url(), session)
    ok = await a.probe(chat=False, timeout=5)
    assert ok.ok
    assert (up.requests[0].method, up.requests[0].path) == ("GET", "/v1/models")
    assert up.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    bad = await a.probe(chat=False, timeout=5)
    assert (bad.ok, bad.error_class, bad.status) == (False, "authentication", 401)
    down = await adapter(refused_url(), session).probe(chat=False, timeout=5)
    assert (down.ok, down.error_class) == (False, "network_refused")


async def test_probe_chat(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    """The chat probe streams a one-token answer; a stream cut short is unhealthy."""
    up = await serve(aiohttp_server, Reply(sse=chunk_stream()),
                     Reply(sse=chunk_stream(finish=False, done=False)))
    a = adapter(up.url(), session)
    ok = await a.probe(chat=True, timeout=5)
    assert ok.ok
    assert ok.ttft_ms is not None
    assert up.requests[0].json()["max_tokens"] == 1
    cut = await a.probe(chat=True, timeout=5)
    assert (cut.ok, cut.error_class) == (False, "network_reset")


def test_split_events_framing() -> None:
    """SSE framing as the spec has it: CRLF, multi-line data, named events, comments, and a
    partial event kept for the next read."""
    from bulwark.providers.base import split_events

    events, rest = split_events(b'data: {"a":1}\r\n\r\n: keep-alive\n\nevent: ping\ndata: x\n'
                                b"data: y\n\ndata: {\"b\"")
    assert events == [("", b'{"a":1}'), ("ping", b"x\ny")]
    assert rest == b'data: {"b"'
    more, rest = split_events(rest + b":2}\n\n")
    assert more == [("", b'{"b":2}')]
    assert rest == b""


@pytest.mark.parametrize("buf", [
    b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n',
    b'data: {"a":1}\n\ndata: {"b"',
    b'data:{"a":1}\n\n',
    b"data: \n\n",
    b"event: ping\ndata: x\n\ndata: y\n\n",
    b": keep-alive\n\ndata: x\n\n",
    b"data: a\ndata: b\n\ndata: c\n\n",
    b"data: a\n\n\n",
    b"data: a\r\n\r\ndata: b\n\n",
    b"\n\n",
    b"data: partial",
    b"",
], ids=["plain", "partial", "no-space", "empty-data", "named", "comment", "multi-line",
        "extra-blank", "crlf", "blank", "no-end", "nothing"])
def test_split_events_fast_path_agrees_with_the_general_parser(buf: bytes) -> None:
    """The one-regex path for plain `data:` events gives what the line-by-line parser gives,
    and leaves anything else to it."""
    from bulwark.providers.base import _split_any, split_events

    assert split_events(buf) == _split_any(buf)
