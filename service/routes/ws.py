"""`GET /v1/ws`: chat over a WebSocket (CONTRACT.md "WebSocket chat", docs/WEBSOCKET.md).

Each `chat` frame is validated like `POST /v1/chat/completions` (service/chatreq.py), then
runs on the same dispatcher with a `WsSink` instead of the SSE one — so failover before the
first token, breakers, retries, the attempt cap and deadlines are those of HTTP. The answer
is put together as it passes and stored (service/wsanswers.py) for `resume`; it keeps
running when the socket goes away (that is what resume is for), and stops only on `cancel`,
its deadline, or shutdown.

After the upgrade the socket is no longer aiohttp's: the handler validates the upgrade,
writes the 101 itself and hands the transport to a `WsSocket` (service/wsconn.py), which
speaks RFC 6455; the handler then returns, and aiohttp's request, parser and task are gone.
An idle socket is a `Connection` and its `WsSocket`, nothing more (10,000 idle sockets fit
in 150 MiB: docs/PERFORMANCE.md).

Output: every frame of a socket goes through one bounded queue, flushed by one loop
callback per burst as one transport write (as the SSE path writes what one upstream read
brought). Nothing that feeds the queue ever waits on the client: while the transport is
over its high-water mark the queue grows, and a reader that falls behind by more than
`ws_max_queued_bytes` is closed with 1008, so a slow client can neither slow the upstream
read nor grow our memory. Control frames (pong, ping, close) are whole frames written
between flushes, so batches never split.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Annotated, Any

import msgspec
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from bulwark.clientkeys import KeyRecord
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
from service.auth import check_key_model
from service.chatreq import (
    accepts_canned,
    check_flags,
    check_limits,
    decode_chat,
    wants_continuation,
)
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
from service.wsconn import Detached, WsSocket, detach, handshake_key, switching_protocols
from service.wshub import WsHub

log = logging.getLogger("bulwark.ws")

routes = web.RouteTableDef()

#: A session token is the client's secret for resuming its answers: long enough not to be
#: guessed, short enough for a URL.
_SESSION = re.compile(r"[A-Za-z0-9_-]{16,128}")
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
    """One socket's chat: its frames in, its output out, its requests in flight. Holds no
    aiohttp request: what it needs of the upgrade is copied (the client key, the few
    headers a chat reads), so that aiohttp's per-request objects die with the upgrade."""

    __slots__ = ("_app", "_cap", "_close", "_dead", "_flushing", "_headers", "_key", "_out",
                 "_queued", "_settings", "_side", "draining", "hub", "in_flight", "scope",
                 "session", "sock")

    def __init__(self, app: web.Application, session: str, headers: Mapping[str, str],
                 key: KeyRecord | None, max_frame: int) -> None:
        self._app = app
        self._settings: Settings = app[SETTINGS]
        self._headers = headers
        self._key = key
        self._cap = self._settings.ws_max_queued_bytes
        self.session = session
        self.scope = scope_of(session)
        self.hub = app[WS]
        self.sock = WsSocket(self, max_frame)
        self.in_flight: dict[str, WsSink] = {}
        self.draining = False
        self._out: list[bytes] = []
        self._queued = 0
        self._dead = False  # no more output: closing, closed, or too slow
        self._close: tuple[int, bytes] | None = None
        # Output goes out from one loop callback per burst, so that whatever a burst put
        # (several deltas of one upstream read, an event to many) is one transport write.
        # No task: an idle socket holds nothing but itself.
        self._flushing = False
        self._side: set[asyncio.Task[None]] | None = None

    def start(self) -> None:
        self.hub.sockets.add(self)
        if self.hub.draining:
            self.drain()

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
        if not self._flushing and not self.sock.paused:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out = self._out
        sock = self.sock
        # While the transport is over its high-water mark the queue takes the rest, up to
        # the cap; resume_writing (on_writable) flushes it. A close goes out regardless:
        # what is queued is in memory already, and the close frame must follow it.
        if out and (not sock.paused or self._close is not None):
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._queued = 0
            sock.write(data)
        if self._close is not None and not out:
            sock.close(*self._close)

    def on_writable(self) -> None:
        if self._out and not self._flushing:
            self._flush()

    def request_close(self, code: int, message: bytes) -> None:
        """Close after everything queued so far has been written; nothing more is queued."""
        if self._close is None:
            self._close = (code, message)
            self._dead = True
            if not self._flushing:
                self._flushing = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _too_slow(self) -> None:
        self._dead = True
        self._out.clear()
        self._queued = 0
        self.hub.slow_closed += 1
        log.warning("websocket closed: reader too slow",
                    extra={"queued_limit": self._cap})
        # The close frame waits behind what the transport holds; a reader that does not
        # take it within CLOSE_SEC is dropped with its backlog (WsSocket._give_up).
        self.sock.close(1008, b"reader too slow: output over the limit")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        if self._side is None:
            self._side = set()
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    # -- input (WsSocket's Peer) --------------------------------------------------------

    def on_binary(self) -> None:
        self.put(wsproto.error(InvalidRequest(
            "Binary frames are not part of the protocol; send JSON text frames.",
            code="invalid_frame")))

    def on_text(self, text: str) -> None:
        self._on_text(text)

    def on_lost(self) -> None:
        self.hub.forget(self)
        self._dead = True
        self._out.clear()
        self._queued = 0
        # Requests keep running without the socket: their answers are stored for resume.

    def heartbeat(self) -> None:
        self.sock.beat()

    def abort(self) -> None:
        self.sock.abort()

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
        app = self._app
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
            check_key_model(self._key, chat.model)
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
                      passthrough=self._headers,
                      accept_canned=accepts_canned(self._headers),
                      continue_stream=wants_continuation(
                          self._headers, app[MODELS].get(chat.model)))
        hub.store.begin(sink.key)
        self.in_flight[cid] = sink
        hub.running[sink.key] = sink
        sink.task = asyncio.create_task(self._run(req, sink), name="ws-chat")
        hub.tasks.add(sink.task)

    async def _admit(self, chat: ChatRequest) -> Meter | None:
        """Each chat on a socket spends from its key's limits, as an HTTP request does (the
        upgrade spent one too); raises RateLimited. The token meter, for a TPM limit."""
        key = self._key
        if key is None or (key.rpm is None and key.tpm is None):
            return None
        limiter = self._app[GUARD].limiter
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
            await self._app[DISPATCHER].stream(
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
                self._app[GUARD].limiter.charge(meter.budget, meter.tokens())
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


#: What a socket's chats read of its upgrade request's headers: the x-bulwark-* flags
#: (accepts_canned, wants_continuation) and the headers forwarded upstream (the
#: simulator's x-sim-* script controls: bulwark/providers/openai.py `passthrough_prefix`).
_KEPT_PREFIXES = ("x-bulwark-", "x-sim-")
_NO_HEADERS: Mapping[str, str] = CIMultiDictProxy(CIMultiDict())


def _kept_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    kept = [(k, v) for k, v in headers.items() if k.lower().startswith(_KEPT_PREFIXES)]
    return CIMultiDictProxy(CIMultiDict(kept)) if kept else _NO_HEADERS


@routes.get("/v1/ws")
@describe("Chat over a WebSocket", tags=("chat",), query=WsQuery,
          responses={101: None},
          errors=(400,),
          description=("A WebSocket upgrade (`Connection: Upgrade`, `Upgrade: websocket`); a "
                       "plain GET is a 400 `websocket_expected`. See docs/WEBSOCKET.md."))
async def websocket(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    session = request.query.get("session")
    if session is None:
        session = secrets.token_urlsafe(24)
    elif not _SESSION.fullmatch(session):
        raise InvalidRequest("session must be 16 to 128 characters of A-Z, a-z, 0-9, _ and -.",
                             code="invalid_session", param="session")
    headers = request.headers
    key = handshake_key(request.method, headers)
    if key is None:
        raise InvalidRequest("GET /v1/ws expects a WebSocket upgrade.",
                             code="websocket_expected")
    check_flags(headers)  # a bad flag is the upgrade's 400, not every chat's
    max_frame = settings.ws_max_frame_bytes or settings.max_body_bytes + _FRAME_ENVELOPE
    conn = Connection(app, session, _kept_headers(headers), request.get(CLIENT_KEY),
                      max_frame)
    conn.start()
    if not detach(request, conn.sock, switching_protocols(key, request[REQUEST_ID])):
        conn.on_lost()
    return Detached()


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
    """The hub's fan-out and heartbeat tasks and the answer store's writer; after the bus
    (it writes through it), so torn down before it: the last answers are written on the
    way out."""
    hub = app[WS]
    fanout = asyncio.create_task(hub.run(), name="ws-fanout")
    beats = asyncio.create_task(hub.heartbeats(app[SETTINGS].ws_heartbeat_sec),
                                name="ws-heartbeat")
    writer = asyncio.create_task(hub.store.run(), name="ws-answers")
    try:
        yield
    finally:
        await hub.close()
        hub.store.stop()
        await asyncio.gather(writer, return_exceptions=True)
        await hub.store.flush()
        fanout.cancel()
        beats.cancel()
        await asyncio.gather(fanout, beats, return_exceptions=True)
