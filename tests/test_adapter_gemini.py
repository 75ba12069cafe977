"""GeminiAdapter against a scripted upstream speaking Gemini's real generateContent wire."""

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
from bulwark.providers.gemini import GeminiAdapter
from bulwark.wire import ChatRequest, Chunk, completion_decoder
from tests.scripted import Reply, Upstream, refused_url, start_upstream

C = ErrorClass
KEY = "AIzaSyTESTKEY-abcdefghijklmnopqrstu"
ENV = {"GEMINI_API_KEY": KEY}
MODEL = "gemini-2.5-flash"

USAGE = {"promptTokenCount": 8, "candidatesTokenCount": 9, "thoughtsTokenCount": 20,
         "totalTokenCount": 37,
         "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]}
SAFETY = [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]


def response(parts: list[dict[str, Any]], finish: str | None = "STOP",
             usage: dict[str, Any] | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0,
                            "safetyRatings": SAFETY}
    if finish:
        cand["finishReason"] = finish
    return {"candidates": [cand], "usageMetadata": usage or USAGE, "modelVersion": MODEL,
            "responseId": "mX3aZ8-bCYqNz7IP4ZWaqAE"}


def sse(obj: dict[str, Any]) -> bytes:
    # Gemini frames its events with CRLF.
    return b"data: " + msgspec.json.encode(obj) + b"\r\n\r\n"


def text_stream(finish: bool = True) -> list[bytes]:
    early = {"promptTokenCount": 10, "totalTokenCount": 10}
    events = [
        sse(response([{"text": "The"}], finish=None, usage=early)),
        sse(response([{"text": "**thinking**", "thought": True}, {"text": " quick brown fox"}],
                     finish=None, usage=early)),
    ]
    if finish:
        events.append(sse(response([{"text": " jumps."}], usage={
            "promptTokenCount": 10, "candidatesTokenCount": 12, "totalTokenCount": 22})))
    return events


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def adapter(url: str, session: aiohttp.ClientSession, *, cap: float = 10.0) -> GeminiAdapter:
    cfg = ProviderConfig(name="gemini", kind="gemini", base_url=url, api_key_env="GEMINI_API_KEY",
                         models={"default": MODEL})
    return GeminiAdapter(resolve(cfg, Settings()), session, retry_after_cap=cap, env=ENV)


def make_call(**request: Any) -> Call:
    request.setdefault("messages", [{"role": "user", "content": "Hi"}])
    req = msgspec.convert({"model": "default", **request}, ChatRequest)
    return Call(request=req, upstream_model=MODEL, request_id="req-1")


async def serve(aiohttp_server: AiohttpServer, *replies: Reply) -> Upstream:
    return await start_upstream(aiohttp_server, replies)


async def collect(events: AsyncIterator[StreamEvent]) -> list[Chunk]:
    return [e.chunk async for e in events]


async def failure(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession,
                  replies: Sequence[Reply], *, stream: bool = False,
                  cap: float = 10.0) -> UpstreamError:
    up = await start_upstream(aiohttp_server, replies)
    a = adapter(up.url("/v1beta"), session, cap=cap)
    with pytest.raises(UpstreamError) as info:
        if stream:
            await collect(a.stream(make_call(stream=True)))
        else:
            await a.complete(make_call())
    return info.value


# --- request translation ----------------------------------------------------------------


async def test_request_url_headers_and_config(aiohttp_server: AiohttpServer,
                                              session: aiohttp.ClientSession) -> None:
    """System → systemInstruction, roles user/model, generationConfig; key only in a header."""
    up = await serve(aiohttp_server, Reply.json(response([{"text": "ok"}])))
    await adapter(up.url("/v1beta"), session).complete(make_call(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Describe"},
                                     {"type": "image_url",
                                      "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]},
    ], temperature=1.5, top_p=0.5, max_tokens=50, stop=["END", "STOP"], seed=7,
        response_format={"type": "json_object"}))
    (rec,) = up.requests
    assert (rec.method, rec.path) == ("POST", f"/v1beta/models/{MODEL}:generateContent")
    assert rec.query_string == ""
    assert rec.headers["x-goog-api-key"] == KEY
    assert KEY not in rec.path + rec.query_string
    assert rec.json() == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!"}]},
            {"role": "user", "parts": [
                {"text": "Describe"},
                {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}},
            ]},
        ],
        "generationConfig": {"candidateCount": 1, "temperature": 1.5, "topP": 0.5,
                             "maxOutputTokens": 50, "stopSequences": ["END", "STOP"],
                             "seed": 7, "responseMimeType": "application/json"},
    }


async def test_request_tools_and_tool_turns(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """Tools → functionDeclarations; tool calls/results ↔ functionCall/functionResponse by name."""
    up = await serve(aiohttp_server, Reply.json(response([{"text": "ok"}])))
    params = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    await adapter(up.url("/v1beta"), session).complete(make_call(
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_b", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 18}"},
            {"role": "tool", "tool_call_id": "call_b", "content": "sunny, 25C"},
        ],
        tools=[{"type": "function", "function": {"name": "get_weather",
                                                 "description": "Weather in a city",
                                                 "parameters": params}}],
        tool_choice="required",
    ))
    body = up.requests[0].json()
    assert body["contents"][1:] == [
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
        ]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
            {"functionResponse": {"name": "get_weather",
                                  "response": {"content": "sunny, 25C"}}},
        ]},
    ]
    assert body["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather in a city",
         "parametersJsonSchema": params}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


async def test_request_forced_function_and_http_image(aiohttp_server: AiohttpServer,
                                                      session: aiohttp.ClientSession) -> None:
    """A forced function is ANY + allowedFunctionNames; an http image URL is refused unsent."""
    up = await serve(aiohttp_server, Reply.json(response([{"text": "ok"}])))
    a = adapter(up.url("/v1beta"), session)
    await a.complete(make_call(tools=[{"type": "function", "function": {"name": "f"}}],
                               tool_choice={"type": "function", "function": {"name": "f"}}))
    assert up.requests[0].json()["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}}
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(UpstreamError) as info:
        await a.complete(make_call(messages=[{"role": "user", "content": [image]}]))
    assert info.value.cls is C.UNSUPPORTED
    assert info.value.param == "messages[0].content[0]"
    assert len(up.requests) == 1


# --- response translation ---------------------------------------------------------------


async def test_complete_translates_response(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """Text parts join (thoughts skipped), usage counts thinking as completion tokens."""
    up = await serve(aiohttp_server, Reply.json(response(
        [{"text": "plan", "thought": True}, {"text": "Hello! "}, {"text": "How can I help?"}])))
    done = await adapter(up.url("/v1beta"), session).complete(make_call())
    assert completion_decoder.decode(done.body) == done.parsed
    parsed = done.parsed
    assert parsed.id.startswith("chatcmpl-")
    assert parsed.model == "default"
    assert parsed.choices[0].message.content == "Hello! How can I help?"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens,
            parsed.usage.total_tokens) == (8, 29, 37)


async def test_complete_function_call(aiohttp_server: AiohttpServer,
                                      session: aiohttp.ClientSession) -> None:
    """functionCall parts become tool_calls with fresh ids; STOP then means tool_calls."""
    up = await serve(aiohttp_server, Reply.json(response([
        {"functionCall": {"name": "get_weather", "args": {"city": "Boston"}}}])))
    parsed = (await adapter(up.url("/v1beta"), session).complete(make_call())).parsed
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    (tc,) = choice.message.tool_calls
    assert isinstance(tc.id, str)
    assert tc.id.startswith("call_")
    assert tc.function.name == "get_weather"
    assert isinstance(tc.function.arguments, str)
    assert msgspec.json.decode(tc.function.arguments) == {"city": "Boston"}


@pytest.mark.parametrize(("reason", "finish"), [
    ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("OTHER", "stop"),
])
async def test_complete_finish_reasons(aiohttp_server: AiohttpServer,
                                       session: aiohttp.ClientSession,
                                       reason: str, finish: str) -> None:
    """Gemini's finishReason maps to OpenAI's finish_reason."""
    up = await serve(aiohttp_server, Reply.json(response([{"text": "x"}], finish=reason)))
    done = await adapter(up.url("/v1beta"), session).complete(make_call())
    assert done.parsed.choices[0].finish_reason == finish


async def test_blocked_prompt_is_content_policy(aiohttp_server: AiohttpServer,
                                                session: aiohttp.ClientSession) -> None:
    """promptFeedback.blockReason with no candidates is CONTENT_POLICY, streamed or not."""
    blocked = {"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": SAFETY},
               "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
               "modelVersion": MODEL}
    err = await failure(aiohttp_server, session, [Reply.json(blocked)])
    assert err.cls is C.CONTENT_POLICY
    assert err.client_message
    err = await failure(aiohttp_server, session, [Reply(sse=[sse(blocked)])], stream=True)
    assert err.cls is C.CONTENT_POLICY


# --- streaming --------------------------------------------------------------------------


async def test_stream_translates_events(aiohttp_server: AiohttpServer,
                                        session: aiohttp.ClientSession) -> None:
    """Role chunk, text deltas, finish chunk, then a usage chunk when include_usage."""
    up = await serve(aiohttp_server, Reply(sse=text_stream()))
    call = make_call(stream=True, stream_options={"include_usage": True})
    events = [e async for e in adapter(up.url("/v1beta"), session).stream(call)]
    chunks = [e.chunk for e in events]
    for e in events:
        assert msgspec.json.decode(e.raw, type=Chunk) == e.chunk
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert contents == ["The", " quick brown fox", " jumps."]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (10, 12)
    rec = up.requests[0]
    assert rec.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert rec.query_string == "alt=sse"
    assert KEY not in rec.path + rec.query_string


async def test_stream_function_call_and_no_usage(aiohttp_server: AiohttpServer,
                                                 session: aiohttp.ClientSession) -> None:
    """A streamed functionCall is one tool-call delta; no usage chunk without include_usage."""
    events = [sse(response([{"functionCall": {"name": "get_weather",
                                              "args": {"city": "Boston"}}}]))]
    up = await serve(aiohttp_server, Reply(sse=events))
    chunks = await collect(adapter(up.url("/v1beta"), session).stream(make_call(stream=True)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.usage is None for c in chunks)
    tool_calls = chunks[1].choices[0].delta.tool_calls
    assert tool_calls
    (tc,) = tool_calls
    assert (tc.index, tc.function.name) == (0, "get_weather")
    assert tc.function.arguments == "{\"city\":\"Boston\"}"


async def test_stream_ended_early(aiohttp_server: AiohttpServer,
                                  session: aiohttp.ClientSession) -> None:
    """A clean close before any finishReason is a failed attempt, never a complete answer."""
    err = await failure(aiohttp_server, session, [Reply(sse=text_stream(finish=False))],
                        stream=True)
    assert err.cls is C.NETWORK_RESET
    assert "ended early" in err.detail


async def test_stream_reset_and_error_event(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """A reset mid-stream is NETWORK_RESET; an `error` object in the stream is classified."""
    err = await failure(aiohttp_server, session,
                        [Reply(sse=text_stream(finish=False), reset=True)], stream=True)
    assert err.cls is C.NETWORK_RESET
    unavailable = {"error": {"code": 503, "message": "The model is overloaded.",
                             "status": "UNAVAILABLE"}}
    err = await failure(aiohttp_server, session,
                        [Reply(sse=[*text_stream(finish=False), sse(unavailable)])], stream=True)
    assert err.cls is C.SERVER_ERROR


# --- errors -----------------------------------------------------------------------------


def google_error(code: int, status: str, message: str,
                 details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status,
                      "details": details or []}}


RATE_LIMITED = google_error(429, "RESOURCE_EXHAUSTED",
                            "You exceeded your current quota, please check your plan and billing "
                            "details.", [
                                {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                                 "violations": [{
                                     "quotaMetric": "generativelanguage.googleapis.com/"
                                                    "generate_content_free_tier_requests",
                                     "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-"
                                                "FreeTier",
                                     "quotaValue": "10"}]},
                                {"@type": "type.googleapis.com/google.rpc.Help",
                                 "links": [{"url": "https://ai.google.dev/gemini-api/docs/"
                                                   "rate-limits"}]},
                                {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                 "retryDelay": "36s"},
                            ])


async def test_429_retry_info_is_rate_limit(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """A per-minute 429 ("quota" and all) is RATE_LIMIT with RetryInfo's delay, capped."""
    err = await failure(aiohttp_server, session, [Reply.json(RATE_LIMITED, status=429)], cap=60)
    assert err.cls is C.RATE_LIMIT
    assert err.retry_after == 36
    err = await failure(aiohttp_server, session, [Reply.json(RATE_LIMITED, status=429)], cap=10)
    assert err.retry_after == 10


async def test_429_retry_after_header(aiohttp_server: AiohttpServer,
                                      session: aiohttp.ClientSession) -> None:
    """A Retry-After header wins over the body's hint."""
    reply = Reply.json(RATE_LIMITED, status=429, headers={"Retry-After": "3"})
    err = await failure(aiohttp_server, session, [reply], cap=60)
    assert (err.cls, err.retry_after) == (C.RATE_LIMIT, 3)


async def test_429_per_day_is_quota(aiohttp_server: AiohttpServer,
                                    session: aiohttp.ClientSession) -> None:
    """A per-day quota violation is QUOTA_EXCEEDED: it will not clear in seconds."""
    body = google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}])
    err = await failure(aiohttp_server, session, [Reply.json(body, status=429)])
    assert err.cls is C.QUOTA_EXCEEDED


async def test_invalid_key_is_authentication(aiohttp_server: AiohttpServer,
                                             session: aiohttp.ClientSession) -> None:
    """Gemini's 400 API_KEY_INVALID and a 401 are AUTHENTICATION; the key is not in detail."""
    body = google_error(400, "INVALID_ARGUMENT",
                        f"API key not valid. Please pass a valid API key. ({KEY})", [
                            {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                             "reason": "API_KEY_INVALID", "domain": "googleapis.com"}])
    err = await failure(aiohttp_server, session, [Reply.json(body, status=400)])
    assert err.cls is C.AUTHENTICATION
    assert err.client_message is None
    assert KEY not in err.detail
    assert KEY not in str(err)
    body = google_error(401, "UNAUTHENTICATED", f"Request had invalid credentials {KEY}")
    err = await failure(aiohttp_server, session, [Reply.json(body, status=401)])
    assert err.cls is C.AUTHENTICATION
    assert KEY not in err.detail


async def test_region_refused_is_permission(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """400 FAILED_PRECONDITION (unsupported location) is our account's PERMISSION problem."""
    body = google_error(400, "FAILED_PRECONDITION",
                        "User location is not supported for the API use.")
    err = await failure(aiohttp_server, session, [Reply.json(body, status=400)])
    assert err.cls is C.PERMISSION


async def test_bad_request_and_context_length(aiohttp_server: AiohttpServer,
                                              session: aiohttp.ClientSession) -> None:
    """A real INVALID_ARGUMENT keeps its message for the caller; too many tokens is context."""
    body = google_error(400, "INVALID_ARGUMENT", "Invalid value at 'contents[0].role'")
    err = await failure(aiohttp_server, session, [Reply.json(body, status=400)])
    assert (err.cls, err.client_message) == (C.BAD_REQUEST, "Invalid value at 'contents[0].role'")
    body = google_error(400, "INVALID_ARGUMENT", "The input token count (1200000) exceeds the "
                        "maximum number of tokens allowed (1048576).")
    err = await failure(aiohttp_server, session, [Reply.json(body, status=400)])
    assert err.cls is C.CONTEXT_LENGTH


@pytest.mark.parametrize(("status", "body"), [
    (503, msgspec.json.encode(google_error(503, "UNAVAILABLE", "The model is overloaded."))),
    (500, msgspec.json.encode(google_error(500, "INTERNAL", "An internal error has occurred."))),
    (502, b"<html><body>Bad Gateway</body></html>"),
])
async def test_5xx_is_server_error(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession,
                                   status: int, body: bytes) -> None:
    """5xx, JSON or an HTML page, is SERVER_ERROR."""
    err = await failure(aiohttp_server, session, [Reply(status=status, body=body)])
    assert (err.cls, err.status) == (C.SERVER_ERROR, status)


async def test_malformed_json(aiohttp_server: AiohttpServer,
                              session: aiohttp.ClientSession) -> None:
    """A 200 that is not JSON is MALFORMED_RESPONSE, in a body or in an event."""
    err = await failure(aiohttp_server, session, [Reply(body=b"{\"candidates\": [{")])
    assert err.cls is C.MALFORMED_RESPONSE
    err = await failure(aiohttp_server, session, [Reply(sse=[b"data: {\"candid\r\n\r\n"])],
                        stream=True)
    assert err.cls is C.MALFORMED_RESPONSE


async def test_connection_reset_and_refused(aiohttp_server: AiohttpServer,
                                            session: aiohttp.ClientSession) -> None:
    """A reset before the answer is NETWORK_RESET; nothing listening is NETWORK_REFUSED."""
    err = await failure(aiohttp_server, session, [Reply(reset=True)])
    assert err.cls is C.NETWORK_RESET
    a = adapter(refused_url("/v1beta"), session)
    with pytest.raises(UpstreamError) as info:
        await a.complete(make_call())
    assert info.value.cls is C.NETWORK_REFUSED
    with pytest.raises(UpstreamError) as info:
        await collect(a.stream(make_call(stream=True)))
    assert info.value.cls is C.NETWORK_REFUSED


# --- probe ------------------------------------------------------------------------------


async def test_probe(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    """GET /models with the key header is the probe; a failure is classified, never raised."""
    models = {"models": [{"name": f"models/{MODEL}", "displayName": "Gemini 2.5 Flash"}]}
    up = await serve(aiohttp_server, Reply.json(models),
                     Reply.json(google_error(503, "UNAVAILABLE", "overloaded"), status=503))
    a = adapter(up.url("/v1beta"), session)
    ok = await a.probe(chat=False, timeout=5)
    assert ok.ok
    rec = up.requests[0]
    assert (rec.method, rec.path, rec.query_string) == ("GET", "/v1beta/models", "")
    assert rec.headers["x-goog-api-key"] == KEY
    bad = await a.probe(chat=False, timeout=5)
    assert (bad.ok, bad.error_class, bad.status) == (False, "server_error", 503)
    down = await adapter(refused_url("/v1beta"), session).probe(chat=False, timeout=5)
    assert (down.ok, down.error_class) == (False, "network_refused")


async def test_probe_chat(aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> None:
    """The chat probe streams one token and reports its first-chunk time."""
    up = await serve(aiohttp_server, Reply(sse=text_stream()))
    result = await adapter(up.url("/v1beta"), session).probe(chat=True, timeout=5)
    assert result.ok
    assert result.ttft_ms is not None
    assert up.requests[0].json()["generationConfig"]["maxOutputTokens"] == 1
