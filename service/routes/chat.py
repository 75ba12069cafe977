"""`POST /v1/chat/completions` and `GET /v1/models`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import aiohttp
import msgspec
from aiohttp import web

from bulwark import metrics
from bulwark.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge
from bulwark.providers.base import StreamEvent
from bulwark.wire import ChatRequest, ModelCard, ModelList, encoder, request_decoder
from service.dispatch import ClientGone, Fallback, Request
from service.keys import DISPATCHER, REQUEST_ID, ROUTER, SETTINGS, STREAMS

routes = web.RouteTableDef()

_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]*)`")
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Tell nginx-style proxies in front of us not to buffer the stream.
    "X-Accel-Buffering": "no",
}


def _decode(body: bytes) -> ChatRequest:
    try:
        return request_decoder.decode(body)
    except msgspec.ValidationError as err:
        text = str(err)
        m, f = _PATH.search(text), _FIELD.search(text)
        where = m.group(1) if m else ""
        field = f.group(1) if f else ""
        param = ".".join(p for p in (where, field) if p) or None
        raise InvalidRequest(f"Invalid request: {text}", code="invalid_request",
                             param=param) from None
    except msgspec.DecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None


def _check_limits(chat: ChatRequest, *, max_messages: int, max_chars: int) -> None:
    if len(chat.messages) > max_messages:
        raise InvalidRequest(f"Too many messages: at most {max_messages}.",
                             code="too_many_messages", param="messages")
    for i, message in enumerate(chat.messages):
        content = message.content
        size = len(content) if isinstance(content, str) else sum(
            len(str(part.get("text", ""))) for part in content or ())
        if size > max_chars:
            raise InvalidRequest(f"Message {i} is longer than {max_chars} characters.",
                                 code="message_too_long", param=f"messages[{i}].content")


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


def _chat_headers(rid: str, provider: str, attempts: int, fallback: Fallback) -> dict[str, str]:
    return {"x-request-id": rid, "x-bulwark-provider": provider,
            "x-bulwark-attempts": str(attempts), "x-bulwark-fallback": fallback}


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    # [model label, stream]: filled in as soon as the body is decoded.
    seen: list[object] = [metrics.UNKNOWN, False]
    try:
        resp, fallback, code = await _chat_completions(request, seen)
    except GatewayError as err:
        metrics.CHAT.done(str(seen[0]), bool(seen[1]), err.status, started)
        raise
    except asyncio.CancelledError:
        metrics.CHAT.done(str(seen[0]), bool(seen[1]), 499, started)
        raise
    except Exception:
        metrics.CHAT.done(str(seen[0]), bool(seen[1]), 500, started)
        raise
    metrics.CHAT.done(str(seen[0]), bool(seen[1]), code, started, fallback)
    return resp


async def _chat_completions(request: web.Request,
                            seen: list[object]) -> tuple[web.StreamResponse, Fallback, int]:
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLarge(f"The request body is larger than {settings.max_body_bytes} bytes.")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"The request body is larger than {settings.max_body_bytes} bytes.") from None
    chat = _decode(body)
    seen[1] = chat.stream
    _check_limits(chat, max_messages=settings.max_messages, max_chars=settings.max_message_chars)
    if not request.app[ROUTER].has_model(chat.model):
        raise NotFound(f"The model {chat.model!r} does not exist.", code="model_not_found",
                       param="model")
    seen[0] = chat.model
    rid = request[REQUEST_ID]
    req = Request(chat=chat, request_id=rid,
                  deadline=_deadline(request, chat, settings.request_timeout_sec),
                  passthrough=request.headers)
    dispatcher = request.app[DISPATCHER]
    if not chat.stream:
        answer = await dispatcher.complete(req)
        return web.Response(body=answer.completion.body, content_type="application/json",
                            headers=_chat_headers(rid, answer.provider, answer.attempts,
                                                  answer.fallback)), answer.fallback, 200
    sink = SseSink(request, rid)
    await dispatcher.stream(req, sink)
    assert sink.response is not None  # stream() raises unless it started the response
    return sink.response, sink.fallback, sink.outcome


class SseSink:
    """A chat stream as Server-Sent Events in OpenAI's chunk format."""

    def __init__(self, request: web.Request, request_id: str) -> None:
        self._request = request
        self._rid = request_id
        self.response: web.StreamResponse | None = None
        self._closed = False
        self._task: asyncio.Task[object] | None = None
        self._pending: list[bytes] = []
        self.fallback: Fallback = "none"
        #: The request's status for metrics: 200, the final error event's status, or 499
        #: when the client went away.
        self.outcome = 200

    async def start(self, provider: str, attempts: int, fallback: Fallback) -> None:
        self.fallback = fallback
        headers = _chat_headers(self._rid, provider, attempts, fallback)
        headers.update(_SSE_HEADERS)
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
async def list_models(request: web.Request) -> web.Response:
    cards = [ModelCard(id=m) for m in request.app[ROUTER].models()]
    return web.Response(body=encoder.encode(ModelList(data=cards)), content_type="application/json")


