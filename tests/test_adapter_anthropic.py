"""AnthropicAdapter against a scripted upstream speaking Anthropic's real Messages wire."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import msgspec
import pytest
from pytest_aiohttp import AiohttpServer

from bulwark.config import ProviderConfig, Settings, resolve
from bulwark.errors import ErrorClass, UpstreamError
from bulwark.providers.anthropic import AnthropicAdapter
from bulwark.providers.base import Call, StreamEvent
from bulwark.wire import ChatRequest, Chunk, completion_decoder
from tests.scripted import Reply, Upstream, refused_url, sse_event, start_upstream

C = ErrorClass
KEY = "sk-ant-api03-TESTKEYabcdefghijklmnop"
ENV = {"ANTHROPIC_API_KEY": KEY}

MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll check "},
        {"type": "text", "text": "the weather."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
         "input": {"location": "San Francisco, CA", "unit": "celsius"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 100, "output_tokens": 89, "service_tier": "standard"},
}


def ev(name: str, data: dict[str, Any]) -> bytes:
    return sse_event(data, event=name)


def message_stream(stop: bool = True) -> list[bytes]:
    """Anthropic's documented stream for a text answer followed by a tool call."""
    events = [
        ev("message_start", {"type": "message_start", "message": {
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "stop_sequence": None,
            "usage": {"input_tokens": 472, "output_tokens": 2}, "content": [],
            "stop_reason": None}}),
        ev("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
        ev("ping", {"type": "ping"}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "Okay"}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": ", let's check the weather for San Francisco, CA:"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
            "input": {}}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                   "delta": {"type": "input_json_delta", "partial_json": ""}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": "{\"location\":"}}),
        ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": " \"San Francisco, CA\"}"}}),
        ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ev("message_delta", {"type": "message_delta",
                             "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"output_tokens": 89}}),
    ]
    if stop:
        events.append(ev("message_stop", {"type": "message_stop"}))
    return events


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def adapter(url: str, session: aiohttp.ClientSession, *, cap: float = 10.0) -> AnthropicAdapter:
    cfg = ProviderConfig(name="claude", kind="anthropic", base_url=url,
                         api_key_env="ANTHROPIC_API_KEY",
                         models={"default": "claude-sonnet-4-5"})
    return AnthropicAdapter(resolve(cfg, Settings()), session, retry_after_cap=cap, env=ENV)


def make_call(**request: Any) -> Call:
    request.setdefault("messages", [{"role": "user", "content": "Hi"}])
    req = msgspec.convert({"model": "default", **request}, ChatRequest)
    return Call(request=req, upstream_model="claude-sonnet-4-5", request_id="req-1")


async def serve(aiohttp_server: AiohttpServer, *replies: Reply) -> Upstream:
    return await start_upstream(aiohttp_server, replies)


async def collect(events: AsyncIterator[StreamEvent]) -> list[Chunk]:
    return [e.chunk async for e in events]


async def failure(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession,
                  replies: Sequence[Reply], *, stream: bool = False,
                  cap: float = 10.0) -> UpstreamError:
    up = await start_upstream(aiohttp_server, replies)
    a = adapter(up.url("/v1"), session, cap=cap)
    with pytest.raises(UpstreamError) as info:
        if stream:
            await collect(a.stream(make_call(stream=True)))
        else:
            await a.complete(make_call())
    return info.value


# --- request translation ----------------------------------------------------------------


async def test_request_headers_and_system(aiohttp_server: AiohttpServer,
                                          session: aiohttp.ClientSession) -> None:
    """System/developer messages become `system`; key and version in headers; sampling maps."""
    up = await serve(aiohttp_server, Reply.json(MESSAGE))
    await adapter(up.url(), session).complete(make_call(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "Hi"},
    ], temperature=1.7, top_p=0.9, stop="END", user="u-42"))
    (rec,) = up.requests
    assert (rec.method, rec.path) == ("POST", "/v1/messages")
    assert rec.headers["x-api-key"] == KEY
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert KEY not in rec.path + rec.query_string
    assert "Authorization" not in rec.headers
    assert rec.json() == {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4096,
        "temperature": 1.0,  # clamped: Anthropic's range ends at 1; top_p dropped beside it
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-42"},
    }


async def test_request_tools_images_and_merging(aiohttp_server: AiohttpServer,
                                                session: aiohttp.ClientSession) -> None:
    """Tools, tool calls, tool results and images translate; same-role turns merge."""
    up = await serve(aiohttp_server, Reply.json(MESSAGE))
    await adapter(up.url(), session).complete(make_call(
        max_completion_tokens=300,
        top_p=0.5,
        messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "What is here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ]},
            {"role": "user", "content": "And the weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}},
                {"id": "toolu_2", "type": "function",
                 "function": {"name": "get_time", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, cloudy"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "14:05"},
            {"role": "assistant", "content": "It is "},
        ],
        tools=[
            {"type": "function", "function": {
                "name": "get_weather", "description": "Weather at a place",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]}}},
            {"type": "function", "function": {"name": "get_time"}},
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    ))
    body = up.requests[0].json()
    assert body["max_tokens"] == 300
    assert body["top_p"] == 0.5
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is here?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "text", "text": "And the weather?"},
        ]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, cloudy"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "14:05"},
        ]},
        {"role": "assistant", "content": "It is"},  # prefill may not end in whitespace
    ]
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather at a place",
         "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                          "required": ["location"]}},
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "get_weather",
                                   "disable_parallel_tool_use": True}


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),
    ("required", {"type": "any"}),
])
async def test_request_tool_choice(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession,
                                   choice: str, expected: dict[str, Any]) -> None:
    """OpenAI's tool_choice strings map to Anthropic's auto / none / any."""
    up = await serve(aiohttp_server, Reply.json(MESSAGE))
    tools = [{"type": "function", "function": {"name": "f"}}]
    await adapter(up.url(), session).complete(make_call(tools=tools, tool_choice=choice))
    assert up.requests[0].json()["tool_choice"] == expected


async def test_request_unsupported_is_refused_before_sending(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    """n > 1 and audio parts are refused as the caller's bad request, with nothing sent."""
    up = await serve(aiohttp_server, Reply.json(MESSAGE))
    a = adapter(up.url(), session)
    with pytest.raises(UpstreamError) as info:
        await a.complete(make_call(n=2))
    assert info.value.cls is C.UNSUPPORTED
    assert info.value.param == "n"
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with pytest.raises(UpstreamError) as info:
        await a.complete(make_call(messages=[{"role": "user", "content": [audio]}]))
    assert info.value.param == "messages[0].content[0]"
    assert info.value.client_message
    assert up.requests == []


# --- response translation ---------------------------------------------------------------


async def test_complete_translates_message(aiohttp_server: AiohttpServer,
                                           session: aiohttp.ClientSession) -> None:
    """Text blocks join, tool_use becomes tool_calls, usage counts cached input."""
    up = await serve(aiohttp_server, Reply.json(MESSAGE))
    done = await adapter(up.url(), session).complete(make_call())
    assert completion_decoder.decode(done.body) == done.parsed
    parsed = done.parsed
    assert parsed.id.startswith("chatcmpl-")
    assert parsed.model == "default"
    choice = parsed.choices[0]
    assert choice.message.content == "I'll check the weather."
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    (tc,) = choice.message.tool_calls
    assert (tc.id, tc.type, tc.function.name) == ("toolu_01A09q90qw90lq917835lq9", "function",
                                                  "get_weather")
    assert isinstance(tc.function.arguments, str)
    assert msgspec.json.decode(tc.function.arguments) == {"location": "San Francisco, CA",
                                                          "unit": "celsius"}
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens,
            parsed.usage.total_tokens) == (572, 89, 661)


@pytest.mark.parametrize(("stop_reason", "finish"), [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("refusal", "content_filter"),
])
async def test_complete_finish_reasons(aiohttp_server: AiohttpServer,
                                       session: aiohttp.ClientSession,
                                       stop_reason: str, finish: str) -> None:
    """Anthropic's stop_reason maps to OpenAI's finish_reason."""
    body = {**MESSAGE, "content": [{"type": "text", "text": "x"}], "stop_reason": stop_reason}
    up = await serve(aiohttp_server, Reply.json(body))
    done = await adapter(up.url(), session).complete(make_call())
    assert done.parsed.choices[0].finish_reason == finish
    assert done.parsed.choices[0].message.tool_calls is msgspec.UNSET


# --- streaming --------------------------------------------------------------------------


async def test_stream_translates_events(aiohttp_server: AiohttpServer,
                                        session: aiohttp.ClientSession) -> None:
    """Role chunk, text deltas, tool call with id/name then arguments, finish, usage chunk."""
    up = await serve(aiohttp_server, Reply(sse=message_stream()))
    call = make_call(stream=True, stream_options={"include_usage": True})
    events = [e async for e in adapter(up.url(), session).stream(call)]
    chunks = [e.chunk for e in events]
    for e in events:
        assert msgspec.json.decode(e.raw, type=Chunk) == e.chunk
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Okay, let's check the weather for San Francisco, CA:"
    tool_deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert tool_deltas[0].index == 0
    assert tool_deltas[0].id == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert tool_deltas[0].function.name == "get_weather"
    assert all(t.id is msgspec.UNSET for t in tool_deltas[1:])
    assert "".join(str(t.function.arguments) for t in tool_deltas) == (
        "{\"location\": \"San Francisco, CA\"}")
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert sum(1 for c in chunks if c.finished) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (472, 89)
    body = up.requests[0].json()
    assert body["stream"] is True
    assert up.requests[0].headers["Accept"] == "text/event-stream"


async def test_stream_without_include_usage_has_no_usage_chunk(
        aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    """Without stream_options.include_usage the finish chunk is the last one."""
    up = await serve(aiohttp_server, Reply(sse=message_stream()))
    chunks = await collect(adapter(up.url(), session).stream(make_call(stream=True)))
    assert chunks[-1].finished
    assert all(c.usage is None and c.choices for c in chunks)


async def test_stream_error_event_is_server_error(aiohttp_server: AiohttpServer,
                                                  session: aiohttp.ClientSession) -> None:
    """An `error` event (overloaded_error) mid-stream raises SERVER_ERROR after the chunks."""
    events = [*message_stream()[:4], ev("error", {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})]
    up = await serve(aiohttp_server, Reply(sse=events))
    got: list[Chunk] = []
    with pytest.raises(UpstreamError) as info:
        async for e in adapter(up.url(), session).stream(make_call(stream=True)):
            got.append(e.chunk)
    assert info.value.cls is C.SERVER_ERROR
    assert [c.choices[0].delta.content for c in got][1:] == ["Okay"]


async def test_stream_ended_early(aiohttp_server: AiohttpServer,
                                  session: aiohttp.ClientSession) -> None:
    """A clean close before message_stop is a failed attempt, never a complete answer."""
    err = await failure(aiohttp_server, session, [Reply(sse=message_stream(stop=False))],
                        stream=True)
    assert err.cls is C.NETWORK_RESET
    assert "ended early" in err.detail


async def test_stream_reset_midway(aiohttp_server: AiohttpServer,
                                   session: aiohttp.ClientSession) -> None:
    """A connection reset in the middle of the event stream is NETWORK_RESET."""
    err = await failure(aiohttp_server, session,
                        [Reply(sse=message_stream()[:5], reset=True)], stream=True)
    assert err.cls is C.NETWORK_RESET


async def test_stream_malformed_event(aiohttp_server: AiohttpServer,
                                      session: aiohttp.ClientSession) -> None:
    """An event whose data is not JSON is MALFORMED_RESPONSE."""
    events = [*message_stream()[:2], sse_event(b"{\"type\": \"content_blo", event="x")]
    err = await failure(aiohttp_server, session, [Reply(sse=events)], stream=True)
    assert err.cls is C.MALFORMED_RESPONSE


# --- errors -----------------------------------------------------------------------------


def anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message},
            "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}


async def test_429_retry_after(aiohttp_server: AiohttpServer,
                               session: aiohttp.ClientSession) -> None:
    """429 with Retry-After is RATE_LIMIT carrying the delay."""
    reply = Reply.json(anthropic_error("rate_limit_error", "Number of request tokens has "
                                       "exceeded your per-minute rate limit"),
                       status=429, headers={"retry-after": "17",
                                            "anthropic-ratelimit-requests-remaining": "0"})
    err = await failure(aiohttp_server, session, [reply], cap=60)
    assert err.cls is C.RATE_LIMIT
    assert err.retry_after == 17


async def test_401_hides_key(aiohttp_server: AiohttpServer,
                             session: aiohttp.ClientSession) -> None:
    """401 is AUTHENTICATION, and the key the upstream echoes never reaches the detail."""
    reply = Reply.json(anthropic_error("authentication_error", f"invalid x-api-key {KEY}"),
                       status=401)
    err = await failure(aiohttp_server, session, [reply])
    assert err.cls is C.AUTHENTICATION
    assert KEY not in err.detail
    assert KEY not in str(err)
    assert err.client_message is None


@pytest.mark.parametrize("status", [529, 503, 500])
async def test_overloaded_is_server_error(aiohttp_server: AiohttpServer,
                                          session: aiohttp.ClientSession, status: int) -> None:
    """Anthropic's 529 overloaded (and other 5xx) is SERVER_ERROR."""
    reply = Reply.json(anthropic_error("overloaded_error", "Overloaded"), status=status)
    err = await failure(aiohttp_server, session, [reply])
    assert err.cls is C.SERVER_ERROR
    assert err.status == status


async def test_credit_balance_is_quota(aiohttp_server: AiohttpServer,
                                       session: aiohttp.ClientSession) -> None:
    """Anthropic's 400 'credit balance too low' is our quota problem, not the caller's."""
    reply = Reply.json(anthropic_error(
        "invalid_request_error", "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits."), status=400)
    err = await failure(aiohttp_server, session, [reply])
    assert err.cls is C.QUOTA_EXCEEDED
    assert err.client_message is None


async def test_bad_request_passes_message(aiohttp_server: AiohttpServer,
                                          session: aiohttp.ClientSession) -> None:
    """A genuine 400 keeps Anthropic's message for the caller; prompt too long is context."""
    reply = Reply.json(anthropic_error("invalid_request_error",
                                       "messages.0.content: Field required"), status=400)
    err = await failure(aiohttp_server, session, [reply])
    assert err.cls is C.BAD_REQUEST
    assert err.client_message == "messages.0.content: Field required"
    reply = Reply.json(anthropic_error("invalid_request_error",
                                       "prompt is too long: 213462 tokens > 200000 maximum"),
                       status=400)
    assert (await failure(aiohttp_server, session, [reply])).cls is C.CONTEXT_LENGTH


async def test_malformed_json(aiohttp_server: AiohttpServer,
                              session: aiohttp.ClientSession) -> None:
    """A 200 whose body is not JSON is MALFORMED_RESPONSE."""
    reply = Reply(body=b"{\"id\": \"msg_1\", \"content\": [")
    err = await failure(aiohttp_server, session, [reply])
    assert err.cls is C.MALFORMED_RESPONSE


async def test_connection_reset(aiohttp_server: AiohttpServer,
                                session: aiohttp.ClientSession) -> None:
    """A connection reset before any response is NETWORK_RESET."""
    err = await failure(aiohttp_server, session, [Reply(reset=True)])
    assert err.cls is C.NETWORK_RESET


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    """Nothing listening is NETWORK_REFUSED, for complete and stream alike."""
    a = adapter(refused_url(), session)
    with pytest.raises(UpstreamError) as info:
        await a.complete(make_call())
    assert info.value.cls is C.NETWORK_REFUSED
    with pytest.raises(UpstreamError) as info:
        await collect(a.stream(make_call(stream=True)))
    assert info.value.cls is C.NETWORK_REFUSED


# --- probe ------------------------------------------------------------------------------


async def test_probe_models(aiohttp_server: AiohttpServer,
                            session: aiohttp.ClientSession) -> None:
    """The models probe GETs /models with the key headers; 401 reports authentication."""
    models = {"data": [{"type": "model", "id": "claude-sonnet-4-5-20250929"}], "has_more": False}
    up = await serve(aiohttp_server, Reply.json(models),
                     Reply.json(anthropic_error("authentication_error", "invalid x-api-key"),
                                status=401))
    a = adapter(up.url(), session)
    ok = await a.probe(chat=False, timeout=5)
    assert ok.ok
    assert ok.status == 200
    rec = up.requests[0]
    assert (rec.method, rec.path) == ("GET", "/v1/models")
    assert rec.headers["x-api-key"] == KEY
    assert rec.headers["anthropic-version"] == "2023-06-01"
    bad = await a.probe(chat=False, timeout=5)
    assert not bad.ok
    assert bad.error_class == "authentication"


async def test_probe_chat(aiohttp_server: AiohttpServer,
                          session: aiohttp.ClientSession) -> None:
    """The chat probe sends a one-token message; a full stream is healthy, refusal is not."""
    up = await serve(aiohttp_server, Reply(sse=message_stream()))
    result = await adapter(up.url(), session).probe(chat=True, timeout=5)
    assert result.ok
    assert result.ttft_ms is not None
    assert up.requests[0].json()["max_tokens"] == 1
    down = await adapter(refused_url(), session).probe(chat=True, timeout=5)
    assert not down.ok
    assert down.error_class == "network_refused"
