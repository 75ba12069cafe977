"""`GET /v1/ws`: chat over a WebSocket (CONTRACT.md "WebSocket chat", docs/WEBSOCKET.md).

Each `chat` frame is validated like `POST /v1/chat/completions` (service/chatreq.py), then
runs on the same dispatcher with a `WsSink` instead of the SSE one — so failover before the
first token, breakers, retries, the attempt cap and deadlines are those of HTTP. The answer
is put together as it passes and stored (service/wsanswers.py) for `resume`; it keeps
running when the socket goes away (that is what resume is for), and stops only on `cancel`,
its deadline, or shutdown.

Output: every frame of a socket goes through one bounded queue and one writer task, which
writes whatever has gathered in one transport write (as the SSE path writes what one
upstream read brought) and then waits for the kernel to take it. Nothing that feeds the
queue ever waits on the client: a reader that falls behind by more than
`ws_max_queued_bytes` is closed with 1008, so a slow client can neither slow the upstream
read nor grow our memory. The frames are built here (wsproto.text_frame) rather than by
aiohttp's writer so that a batch is one write; aiohttp still writes its own control frames
(pong, close) to the same transport, whole frames each, which is why batches never split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Annotated, Any

import msgspec
from aiohttp import WSMsgType, web

from bulwark.config import Settings
from bulwark.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
)
from bulwark.providers.base import StreamEvent
from bulwark.wire import ChatRequest, StreamOptions, encoder
from service import wsproto
from service.auth import check_model
from service.chatreq import accepts_canned, check_limits, decode_chat, wants_continuation
from service.dispatch import Fallback, Request
from service.edge import new_request_id
from service.keys import (
    CLIENT_KEY,
    DISPATCHER,
    GUARD,
    MODELS,
    REQUEST_ID,
    ROUTER,
    SETTINGS,
    STREAMS,
    VIEW,
    WS,
)
from service.openapi import describe
from service.ratelimit import Meter, MeteredSink
from service.sync import process_name
from service.wsanswers import AnswerStore, Finished, Outcome, Whole, scope_of
from service.wshub import WsHub

log = logging.getLogger("bulwark.ws")

routes = web.RouteTableDef()

#: A session token is the client's secret for resuming its answers: long enough not to be
#: guessed, short enough for a URL.
_SESSION = re.compile(r"[A-Za-z0-9_-]{16,128}")
#: How long a close waits for the peer's close frame before the connection is dropped.
CLOSE_SEC = 5.0
#: Room around a request body in a chat frame (type, id, the keys themselves).
_FRAME_ENVELOPE = 4096
_SHUTDOWN_MARGIN_SEC = 0.5


def _shutting_down() -> GatewayError:
    return ServiceUnavailable("The gateway is shutting down; reconnect and resume.",
                              code="gateway_shutdown", should_retry=True)


def _cancelled() -> GatewayError:
    return InvalidRequest("The request was cancelled by the client.", code="request_cancelled")


class WsSink:
    """One chat request's stream into its socket, and into the answer store."""

    __slots__ = ("_forward_usage", "_prefix", "cancelled", "cid", "conn", "finished", "key",
                 "meta", "store", "task", "whole")

    def __init__(self, conn: Connection, cid: str, store: AnswerStore,
                 forward_usage: bool) -> None:
        self.conn = conn
        self.cid = cid
        self.key = (conn.scope, cid)
        self.store = store
        self._prefix = wsproto.delta_prefix(cid)
        self._forward_usage = forward_usage
        self.whole = Whole()
        self.meta: tuple[str, int, Fallback] = ("", 0, "none")
        self.cancelled = False
        self.finished = False
        self.task: asyncio.Task[None] | None = None

    async def start(self, provider: str, attempts: int, fallback: Fallback, *,
                    cache_age: float | None = None) -> None:
        # A stored answer's age has no place in the contract's `done` frame; `fallback`
        # ("cache") already tells the client where the answer came from.
        self.meta = (provider, attempts, fallback)

    async def event(self, ev: StreamEvent) -> None:
        chunk = ev.chunk
        self.whole.add(chunk)
        # The usage-only chunk is the client's only when it asked for it (as over HTTP);
        # the done frame carries usage either way.
        if chunk.choices or self._forward_usage:
            self.conn.put(self._prefix + ev.raw + b"}")

    async def done(self) -> None:
        if self.finished:
            return
        self.finished = True
        provider, attempts, fallback = self.meta
        usage = self.whole.usage
        usage_json = None if usage is None else encoder.encode(usage)
        self.conn.put(wsproto.done(self.cid, provider, attempts, fallback, usage_json))
        self.store.finish(self.key, Finished(self.whole.chunk_json(), provider, attempts,
                                             fallback, usage_json, None))

    async def fail(self, err: GatewayError) -> None:
        self.finish_error(_cancelled() if self.cancelled else err)

    def finish_error(self, err: GatewayError) -> None:
        if self.finished:
            return
        self.finished = True
        self.conn.put(wsproto.error(err, self.cid))
        self.store.finish(self.key, Finished.failed(err))

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class Connection:
    """One socket: its frames in, its one writer out, its requests in flight."""

    __slots__ = ("_cap", "_close", "_dead", "_out", "_queued", "_request", "_settings",
                 "_side", "_transport", "_writer", "_ws", "draining", "hub", "in_flight",
                 "scope", "session")

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, session: str,
                 hub: WsHub) -> None:
        self._request = request
        self._ws = ws
        self._transport = request.transport
        self._settings: Settings = request.app[SETTINGS]
        self._cap = self._settings.ws_max_queued_bytes
        self.session = session
        self.scope = scope_of(session)
        self.hub = hub
        self.in_flight: dict[str, WsSink] = {}
        self.draining = False
        self._out: list[bytes] = []
        self._queued = 0
        self._dead = False  # no more output: closing, closed, or too slow
        self._close: tuple[int, bytes] | None = None
        # The writer task exists only while there is output: an idle socket (most of them,
        # most of the time) holds no task at all.
        self._writer: asyncio.Task[None] | None = None
        self._side: set[asyncio.Task[None]] = set()

    # -- output -----------------------------------------------------------------------

    def put(self, payload: bytes) -> None:
        if not self._dead:
            self.put_framed(wsproto.text_frame(payload))

    def put_framed(self, frame: bytes) -> None:
        if self._dead:
            return
        self._out.append(frame)
        self._queued += len(frame)
        if self._queued > self._cap:
            self._too_slow()
            return
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="ws-writer")

    async def _write_loop(self) -> None:
        transport = self._transport
        drain = self._request.writer.drain
        try:
            while True:
                if self._out:
                    out = self._out
                    data = out[0] if len(out) == 1 else b"".join(out)
                    out.clear()
                    self._queued = 0
                    if transport is None or transport.is_closing():
                        self._dead = True
                        return
                    transport.write(data)
                    # Returns at once unless the kernel's buffer and the transport's
                    # high-water mark are full: then we wait, and the queue takes the rest.
                    await drain()
                    continue
                if self._close is not None:
                    self._dead = True
                    code, message = self._close
                    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                        async with asyncio.timeout(CLOSE_SEC):
                            await self._ws.close(code=code, message=message)
                return  # nothing left: the next put starts a new writer
        except ConnectionError:
            self._dead = True
        finally:
            self._writer = None
            if self._dead:
                self._out.clear()

    def request_close(self, code: int, message: bytes) -> None:
        """Close after everything queued so far has been written; nothing more is queued."""
        if self._close is None:
            self._close = (code, message)
            self._dead = True
            if self._writer is None:
                self._writer = asyncio.create_task(self._write_loop(), name="ws-writer")

    def _too_slow(self) -> None:
        self._dead = True
        self._out.clear()
        self._queued = 0
        self.hub.slow_closed += 1
        log.warning("websocket closed: reader too slow",
                    extra={"queued_limit": self._cap})
        if self._writer is not None:
            self._writer.cancel()  # it may be waiting on a reader that never reads
        self._spawn(self._close_now(1008, b"reader too slow: output over the limit"))

    async def _close_now(self, code: int, message: bytes) -> None:
        transport = self._transport
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            async with asyncio.timeout(CLOSE_SEC):
                # No drain: the peer is not reading; the close frame waits in line.
                await self._ws.close(code=code, message=message, drain=False)
        if transport is not None and transport.get_write_buffer_size():
            transport.abort()  # still not read: do not keep its backlog in memory

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    # -- input ------------------------------------------------------------------------

    async def serve(self) -> None:
        self.hub.sockets.add(self)
        if self.hub.draining:
            self.drain()
        try:
            async for msg in self._ws:
                if msg.type is WSMsgType.TEXT:
                    self._on_text(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self.put(wsproto.error(InvalidRequest(
                        "Binary frames are not part of the protocol; send JSON text frames.",
                        code="invalid_frame")))
                else:  # ERROR: aiohttp has closed the socket (e.g. 1009, frame too big)
                    break
        finally:
            self.hub.forget(self)
            self._dead = True
            writer = self._writer
            if writer is not None and self._close is None:
                writer.cancel()
            await asyncio.gather(*([writer] if writer else []), *self._side,
                                 return_exceptions=True)
            # Requests keep running without the socket: their answers are stored for resume.

    def _on_text(self, data: str) -> None:
        try:
            frame = wsproto.decode_frame(data)
        except GatewayError as err:
            self.put(wsproto.error(err))
            return
        match frame:
            case wsproto.Chat():
                self._on_chat(frame)
            case wsproto.Cancel(id=cid):
                self._on_cancel(cid)
            case wsproto.Subscribe(topics=topics):
                self.hub.subscribe(self, list(topics))
            case wsproto.Resume(ids=ids):
                self._spawn(self._resume(ids))

    def _on_chat(self, frame: wsproto.Chat) -> None:
        cid = frame.id
        settings = self._settings
        app = self._request.app
        try:
            if self.draining:
                raise _shutting_down()
            if cid in self.in_flight:
                raise InvalidRequest(f"A request with id {cid!r} is already in flight on "
                                     "this socket.", code="duplicate_id", param="id")
            if (self.scope, cid) in self.hub.running:
                # Still running from an earlier socket of this session: a second request
                # would ask the provider twice for one answer.
                raise InvalidRequest(f"A request with id {cid!r} is still running in this "
                                     "session; resume it.", code="duplicate_id", param="id")
            if len(self.in_flight) >= settings.ws_max_in_flight:
                raise RateLimited(f"At most {settings.ws_max_in_flight} requests may be in "
                                  "flight on one socket.", code="too_many_in_flight",
                                  retry_after=1.0)
            raw = frame.request
            if len(raw) > settings.max_body_bytes:
                raise PayloadTooLarge(
                    f"The request is larger than {settings.max_body_bytes} bytes.")
            chat = decode_chat(raw)
            check_limits(chat, max_messages=settings.max_messages,
                         max_chars=settings.max_message_chars)
            check_model(self._request, chat.model)
            if not app[ROUTER].has_model(chat.model):
                raise NotFound(f"The model {chat.model!r} does not exist.",
                               code="model_not_found", param="model")
        except GatewayError as err:
            self.put(wsproto.error(err, cid))
            return
        forward_usage = chat.include_usage
        # A socket always streams; usage is asked for so that `done` can carry it.
        chat = msgspec.structs.replace(chat, stream=True,
                                       stream_options=StreamOptions(include_usage=True))
        hub = self.hub
        sink = WsSink(self, cid, hub.store, forward_usage)
        req = Request(chat=chat, request_id=new_request_id(),
                      deadline=time.monotonic() + settings.request_timeout_sec,
                      passthrough=self._request.headers,
                      accept_canned=accepts_canned(self._request.headers),
                      continue_stream=wants_continuation(
                          self._request.headers, self._request.app[MODELS].get(chat.model)))
        hub.store.begin(sink.key)
        self.in_flight[cid] = sink
        hub.running[sink.key] = sink
        sink.task = asyncio.create_task(self._run(req, sink), name="ws-chat")
        hub.tasks.add(sink.task)

    async def _admit(self, chat: ChatRequest) -> Meter | None:
        """Each chat on a socket spends from its key's limits, as an HTTP request does (the
        upgrade spent one too); raises RateLimited. The token meter, for a TPM limit."""
        key = self._request.get(CLIENT_KEY)
        if key is None or (key.rpm is None and key.tpm is None):
            return None
        limiter = self._request.app[GUARD].limiter
        budget = limiter.budget(key.id, key.rpm, key.tpm)
        await limiter.admit(budget)
        if budget.tok is None:
            return None
        meter = Meter(budget)
        meter.request(chat)
        return meter

    async def _run(self, req: Request, sink: WsSink) -> None:
        hub = self.hub
        meter: Meter | None = None
        try:
            meter = await self._admit(req.chat)
            # Accepted: valid, and within the key's limits.
            self.put(wsproto.ack(sink.cid, self.session))
            await self._request.app[DISPATCHER].stream(
                req, sink if meter is None else MeteredSink(sink, meter))
        except GatewayError as err:  # before anything was sent: refused, or nobody answered
            sink.finish_error(err)
        except asyncio.CancelledError:
            # Ours to end: a cancel frame, or shutdown past the drain (the dispatcher
            # already ended a started answer with gateway_shutdown, which fail() kept).
            sink.finish_error(_cancelled() if sink.cancelled else _shutting_down())
        except Exception:
            log.exception("websocket chat failed", extra={"request_id": req.request_id})
            sink.finish_error(GatewayError("The gateway failed to handle this request.",
                                           code="internal_error"))
        finally:
            if meter is not None:
                self._request.app[GUARD].limiter.charge(meter.budget, meter.tokens())
            if not sink.finished:  # the dispatcher returned without an ending: a bug
                sink.finish_error(GatewayError("The answer ended without completing.",
                                               code="internal_error"))
            if self.in_flight.get(sink.cid) is sink:
                del self.in_flight[sink.cid]
            if hub.running.get(sink.key) is sink:
                del hub.running[sink.key]
            if sink.task is not None:
                hub.tasks.discard(sink.task)
            if self.draining and not self.in_flight:
                self.request_close(1012, b"service restart")

    def _on_cancel(self, cid: str) -> None:
        sink = self.in_flight.get(cid) or self.hub.running.get((self.scope, cid))
        if sink is None:
            self.put(wsproto.error(NotFound(
                f"No request with id {cid!r} is in flight in this session.",
                code="unknown_id", param="id"), cid))
            return
        sink.cancelled = True
        sink.cancel()

    async def _resume(self, ids: list[str]) -> None:
        # An id streaming on this very socket is already on its way: not twice.
        wanted = [cid for cid in dict.fromkeys(ids) if cid not in self.in_flight]
        await self.hub.store.resume(self.scope, wanted, self._deliver)

    def _deliver(self, cid: str, outcome: Outcome) -> None:
        if isinstance(outcome, GatewayError):
            self.put(wsproto.error(outcome, cid))
        else:
            for frame in outcome.frames(cid):
                self.put(frame)

    # -- shutdown ---------------------------------------------------------------------

    def drain(self) -> None:
        self.draining = True
        if not self.in_flight:
            self.request_close(1012, b"service restart")


class WsQuery(msgspec.Struct, frozen=True, kw_only=True):
    #: Your session token, to resume its answers on a new socket; none: a new session.
    session: Annotated[str, msgspec.Meta(pattern=f"^{_SESSION.pattern}$")] | None = None


@routes.get("/v1/ws")
@describe("Chat over a WebSocket", tags=("chat",), query=WsQuery,
          responses={101: None},
          errors=(400,),
          description=("A WebSocket upgrade (`Connection: Upgrade`, `Upgrade: websocket`); a "
                       "plain GET is a 400 `websocket_expected`. See docs/WEBSOCKET.md."))
async def websocket(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    session = request.query.get("session")
    if session is None:
        session = secrets.token_urlsafe(24)
    elif not _SESSION.fullmatch(session):
        raise InvalidRequest("session must be 16 to 128 characters of A-Z, a-z, 0-9, _ and -.",
                             code="invalid_session", param="session")
    max_frame = settings.ws_max_frame_bytes or settings.max_body_bytes + _FRAME_ENVELOPE
    ws = web.WebSocketResponse(heartbeat=settings.ws_heartbeat_sec, max_msg_size=max_frame,
                               compress=False, timeout=CLOSE_SEC)
    if not ws.can_prepare(request).ok:
        raise InvalidRequest("GET /v1/ws expects a WebSocket upgrade.",
                             code="websocket_expected")
    ws.headers["x-request-id"] = request[REQUEST_ID]
    await ws.prepare(request)
    await Connection(request, ws, session, request.app[WS]).serve()
    return ws


def install(app: web.Application, settings: Settings) -> None:
    """Routes, the hub, and the shutdown hook of WebSocket chat (called by create_app)."""
    app[WS] = WsHub(app[VIEW], AnswerStore(process_name(),
                                           retention_sec=settings.ws_retention_sec))
    app.add_routes(routes)

    async def drain_sockets(app: web.Application) -> None:
        hub = app[WS]
        loop = asyncio.get_running_loop()
        hub.drain(loop.time() + max(0.0, settings.drain_sec - _SHUTDOWN_MARGIN_SEC))
        app[STREAMS].add(hub)  # abandoned with the SSE streams before the drain deadline

    app.on_shutdown.append(drain_sockets)


async def ws_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hub's fan-out task and the answer store's writer; after the bus (it writes
    through it), so torn down before it: the last answers are written on the way out."""
    hub = app[WS]
    fanout = asyncio.create_task(hub.run(), name="ws-fanout")
    writer = asyncio.create_task(hub.store.run(), name="ws-answers")
    try:
        yield
    finally:
        await hub.close()
        hub.store.stop()
        await asyncio.gather(writer, return_exceptions=True)
        await hub.store.flush()
        fanout.cancel()
        await asyncio.gather(fanout, return_exceptions=True)
