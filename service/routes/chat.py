"""`POST /v1/chat/completions` and `GET /v1/models`."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
from aiohttp import web

from bulwark import metrics
from bulwark.cache import parse_cache_control
from bulwark.errors import GatewayError, NotFound, PayloadTooLarge
from bulwark.providers.base import StreamEvent
from bulwark.wire import ChatCompletion, ChatRequest, Chunk, ModelCard, ModelList, encoder
from service import idempotency
from service.auth import check_model
from service.bodies import JobAccepted
from service.chatreq import accepts_canned, check_flags, wants_continuation
from service.chatreq import check_limits as _check_limits
from service.chatreq import decode_chat as _decode
from service.dispatch import ClientGone, Fallback, QueueInstead, Request
from service.edge import DEGRADATION_HEADER
from service.keys import (
    CLIENT_KEY,
    DEGRADATION,
    DISPATCHER,
    ERRORS,
    IDEMPOTENCY_RECORD,
    JOBS,
    METER,
    MODELS,
    RATE_HEADERS,
    REQUEST_ID,
    ROUTER,
    SETTINGS,
    STREAMS,
)
from service.openapi import Body, describe
from service.ratelimit import MeteredSink
from service.respond_async import prefers_async, queue_instead

routes = web.RouteTableDef()

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Tell nginx-style proxies in front of us not to buffer the stream.
    "X-Accel-Buffering": "no",
}


def _deadline(request: web.Request, chat: ChatRequest, default: float) -> float:
    budget = default
    if not chat.stream:
        # The openai SDK tells us how long it will wait (read timeout of a whole answer);
        # answering after it gave up is work thrown away, so that is our deadline too.
        hint = request.headers.get("x-stainless-read-timeout")
        if hint:
            with contextlib.suppress(ValueError):
                budget = min(budget, max(float(hint) * 0.95, 0.5))
    return time.monotonic() + budget


def _scope(request: web.Request) -> str:
    """Whose stored answers these are: one client key's never serve another's."""
    key = request.get(CLIENT_KEY)
    return "" if key is None else key.id


def _chat_headers(rid: str, provider: str, attempts: int, fallback: Fallback,
                  cache_age: float | None = None) -> dict[str, str]:
    headers = {"x-request-id": rid, "x-bulwark-provider": provider,
               "x-bulwark-attempts": str(attempts), "x-bulwark-fallback": fallback}
    if cache_age is not None:
        # Whole seconds, as HTTP's Age header counts them.
        headers["x-bulwark-cache-age"] = str(int(cache_age))
    return headers


_ANSWER_HEADERS = ("x-bulwark-provider", "x-bulwark-attempts", "x-bulwark-fallback")
_MAYBE_HEADERS = ("x-bulwark-degradation", "x-bulwark-cache-age", "Idempotent-Replayed")
_QUEUED = Body(JobAccepted, description=(
    "`Prefer: respond-async` and nothing could answer now: the request is a job; poll "
    "`Location`."), headers=("Location", "Preference-Applied", "x-bulwark-provider",
                             "x-bulwark-fallback"),
    optional_headers=("x-bulwark-degradation", "Idempotent-Replayed"))


def _examples(app: web.Application) -> dict[str, object]:
    policies = app[MODELS]
    models = sorted(policies)
    model = models[0] if models else "default"
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello!"}]}
    return {"answer": chat, "stream": {**chat, "stream": True}}


@routes.post("/v1/chat/completions")
@describe(
    "Create a chat completion", tags=("chat",),
    request=Body(ChatRequest, examples=_examples),
    description=(
        "OpenAI's chat completions. With `\"stream\": true` the answer is Server-Sent "
        "Events: each `data:` line a `chat.completion.chunk`, ending `data: [DONE]`; or, "
        "if the answer cannot be completed, one final error event (`{\"error\": …}`) "
        "and no `[DONE]`."),
    responses={200: (
        Body(ChatCompletion, headers=_ANSWER_HEADERS, optional_headers=_MAYBE_HEADERS),
        Body(media="text/event-stream", events=Chunk, headers=_ANSWER_HEADERS,
             optional_headers=_MAYBE_HEADERS),
    ), 202: _QUEUED},
    headers=("Idempotency-Key", "Prefer", "Cache-Control", "x-bulwark-accept-canned",
             "x-bulwark-continue"),
    errors=(404, 409, 422, 502, 503, 504))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    seen = _Outcome()
    try:
        check_flags(request.headers)
        if idempotency.HEADER in request.headers:  # the feature's only cost without a key
            jobs = request.app.get(JOBS)
            resp = await idempotency.idempotent(
                request, lambda r: _chat_completions(r, seen),
                None if jobs is None else jobs.idempotency, IDEMPOTENCY_RECORD)
        else:
            resp = await _chat_completions(request, seen)
    except GatewayError as err:
        metrics.CHAT.done(seen.model, seen.stream, err.status, started)
        raise
    except asyncio.CancelledError:
        metrics.CHAT.done(seen.model, seen.stream, 499, started)
        raise
    except Exception:
        metrics.CHAT.done(seen.model, seen.stream, 500, started)
        raise
    metrics.CHAT.done(seen.model, seen.stream, seen.status, started, seen.fallback)
    if seen.fallback != "none":
        app = request.app
        if app[SETTINGS].database_url:
            app[ERRORS].fallback_used(seen.fallback, seen.model, seen.provider)
    return resp


class _Outcome:
    """What became of one chat request, for metrics and the fallback history."""

    __slots__ = ("fallback", "model", "provider", "status", "stream")

    def __init__(self) -> None:
        self.model: str = metrics.UNKNOWN  # a configured name once the body is decoded
        self.stream = False
        self.fallback: Fallback = "none"
        self.status = 200
        self.provider = ""


async def _chat_completions(request: web.Request, seen: _Outcome) -> web.StreamResponse:
    app = request.app  # a property that walks the match info: read it once
    settings = app[SETTINGS]
    try:
        # A Content-Length over the limit was refused by the edge; a chunked body is
        # bounded here, as it is read (client_max_size is settings.max_body_bytes).
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The request body is larger than {settings.max_body_bytes} bytes.") from None
    chat = _decode(body)
    seen.stream = chat.stream
    _check_limits(chat, max_messages=settings.max_messages, max_chars=settings.max_message_chars)
    # Before the model lookup: a key limited to some models learns nothing about others.
    check_model(request, chat.model)
    if not app[ROUTER].has_model(chat.model):
        raise NotFound(f"The model {chat.model!r} does not exist.", code="model_not_found",
                       param="model")
    seen.model = chat.model
    meter = request.get(METER)  # a key with a tokens-per-minute limit
    if meter is not None:
        meter.request(chat)
    rid = request[REQUEST_ID]
    headers = request.headers
    cc = parse_cache_control(headers.get("Cache-Control"))
    req = Request(chat=chat, request_id=rid,
                  deadline=_deadline(request, chat, settings.request_timeout_sec),
                  passthrough=headers, no_store=cc.no_store, no_cache=cc.no_cache,
                  accept_canned=accepts_canned(headers), cache_scope=_scope(request),
                  continue_stream=chat.stream and wants_continuation(
                      headers, app[MODELS].get(chat.model)),
                  may_queue=JOBS in app and prefers_async(request))
    dispatcher = app[DISPATCHER]
    try:
        if not chat.stream:
            answer = await dispatcher.complete(req)
            if meter is not None:
                meter.completion(answer.completion.parsed)
            seen.fallback, seen.provider = answer.fallback, answer.provider
            out = _chat_headers(rid, answer.provider, answer.attempts, answer.fallback,
                                answer.cache_age)
            # In the headers rather than `content_type=`, whose setter builds the value anew.
            out["Content-Type"] = "application/json"
            return web.Response(body=answer.completion.body, headers=out)
        sink = SseSink(request, rid, app[DEGRADATION].level.label)
        await dispatcher.stream(req, sink if meter is None else MeteredSink(sink, meter))
    except QueueInstead as queued:
        seen.fallback, seen.status = "queued", 202
        return await queue_instead(request, chat, queued.err)
    seen.fallback, seen.status, seen.provider = sink.fallback, sink.outcome, sink.provider
    assert sink.response is not None  # stream() raises unless it started the response
    return sink.response


class SseSink:
    """A chat stream as Server-Sent Events in OpenAI's chunk format."""

    def __init__(self, request: web.Request, request_id: str, degradation: str) -> None:
        self._request = request
        self._rid = request_id
        #: The level the stream is served under (the edge sets it on every other response).
        self._degradation = degradation
        self.response: web.StreamResponse | None = None
        self._closed = False
        self._task: asyncio.Task[object] | None = None
        self._pending: list[bytes] = []
        #: What was written, when an Idempotency-Key wants the stream stored.
        self._record = request.get(IDEMPOTENCY_RECORD)
        self.fallback: Fallback = "none"
        self.provider = ""
        #: The request's status for metrics: 200, the final error event's status, or 499
        #: when the client went away.
        self.outcome = 200

    async def start(self, provider: str, attempts: int, fallback: Fallback, *,
                    cache_age: float | None = None) -> None:
        self.fallback, self.provider = fallback, provider
        headers = _chat_headers(self._rid, provider, attempts, fallback, cache_age)
        headers.update(_SSE_HEADERS)
        headers[DEGRADATION_HEADER] = self._degradation
        headers.update(self._request.get(RATE_HEADERS) or ())
        self.response = web.StreamResponse(status=200, headers=headers)
        try:
            await self.response.prepare(self._request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as err:
            raise ClientGone from err
        self._task = asyncio.current_task()
        self._request.app[STREAMS].add(self)

    async def _write(self, data: bytes) -> None:
        assert self.response is not None
        if self._closed:
            raise ClientGone
        if self._record is not None:
            self._record.append(data)
        try:
            await self.response.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as err:
            self.outcome = 499
            raise ClientGone from err

    async def event(self, ev: StreamEvent) -> None:
        pending = self._pending
        pending += (b"data: ", ev.raw, b"\n\n")
        if not ev.more:
            self._pending = []
            await self._write(b"".join(pending))

    async def done(self) -> None:
        assert self.response is not None
        if self._closed:
            raise ClientGone
        self._pending.append(b"data: [DONE]\n\n")
        data, self._pending = b"".join(self._pending), []
        self._closed = True
        self._request.app[STREAMS].discard(self)
        if self._record is not None:
            self._record.append(data)
        try:
            await self.response.write_eof(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as err:
            raise ClientGone from err

    async def fail(self, err: GatewayError) -> None:
        # No [DONE] after an error: the openai SDK raises on the error event, and a client
        # that ignored it must not take what came before for a complete answer.
        self.outcome = err.status
        self._request.app[STREAMS].discard(self)
        try:
            self._pending.append(b"data: " + encoder.encode(err.body()) + b"\n\n")
            data, self._pending = b"".join(self._pending), []
            await self._write(data)
            self._closed = True
            assert self.response is not None
            await self.response.write_eof()
        except (ClientGone, ConnectionResetError, asyncio.CancelledError):
            pass

    async def abandon(self, err: GatewayError) -> None:
        """End this stream now with `err` (shutdown past the drain period) and stop the
        handler that feeds it, so the process can exit before it is killed."""
        await self.fail(err)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


@routes.get("/v1/models")
@describe("List the gateway's models", tags=("chat",), responses={200: ModelList})
async def list_models(request: web.Request) -> web.Response:
    cards = [ModelCard(id=m) for m in request.app[ROUTER].models()]
    return web.Response(body=encoder.encode(ModelList(data=cards)), content_type="application/json")


