"""A WebSocket after its upgrade, on the bare transport (RFC 6455), without aiohttp.

Why not aiohttp's WebSocketResponse: it keeps, for the whole life of every socket, the
RequestHandler with its HTTP parser, the request with its parsed message and headers, a
StreamWriter, the response with its reader, queue and heartbeat timers, and the handler
task with its coroutine frames — about 14 KiB per socket before we add anything, which
alone puts 10,000 idle sockets past our 150 MiB target (docs/PERFORMANCE.md). Here a
socket is one `WsSocket` (a slotted asyncio.Protocol) plus its `Connection`
(service/routes/ws.py), and nothing else: no task, no timer while idle.

`detach()` is the one place that reaches into aiohttp's private attributes to take the
connection away from it after the 101; tests/test_ws_socket.py fails if aiohttp changes
under it.

Heartbeats are the hub's: one task calls `beat()` on every socket each period
(service/wshub.py), instead of a timer per socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import struct
from collections.abc import Mapping
from typing import Protocol, cast

from aiohttp import web

#: How long a close waits for the peer's close frame before the connection is dropped.
CLOSE_SEC = 5.0
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
_PING = b"\x89\x00"  # FIN + ping, no payload; a server's frames are never masked
_PACK_CODE = struct.Struct("!H").pack
#: Close codes a peer may send (RFC 6455 7.4.1 and 7.4.2): anything else is a protocol error.
_PEER_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                         1014})


class Peer(Protocol):
    """What a socket reports to (service/routes/ws.py `Connection`)."""

    def on_text(self, text: str) -> None: ...
    def on_binary(self) -> None: ...
    def on_writable(self) -> None: ...
    def on_lost(self) -> None: ...


# -- the upgrade ---------------------------------------------------------------------------


def handshake_key(method: str, headers: Mapping[str, str]) -> str | None:
    """The client's Sec-WebSocket-Key when this is a WebSocket upgrade we accept (RFC 6455
    4.2.1; version 13 only, which every client of the last decade sends), else None."""
    if method != "GET" or headers.get("Upgrade", "").strip().lower() != "websocket":
        return None
    if "upgrade" not in (t.strip().lower() for t in headers.get("Connection", "").split(",")):
        return None
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return None
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    return key


def switching_protocols(key: str, request_id: str) -> bytes:
    """The whole 101 response. No Sec-WebSocket-Extensions: permessage-deflate is never
    negotiated (it would cost a zlib context per socket); no subprotocol either."""
    # SHA-1 is what RFC 6455 4.2.2 prescribes here; nothing secret depends on it.
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID, usedforsecurity=False).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
            b"\r\nx-request-id: " + request_id.encode() + b"\r\n\r\n")


class Detached(web.StreamResponse):
    """What the handler returns for a socket it took over: the 101 is already on the wire,
    so aiohttp's finish_response has nothing to send, and must not keep the connection."""

    def __init__(self) -> None:
        super().__init__(status=101)
        self.force_close()

    @property
    def prepared(self) -> bool:
        return True

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def detach(request: web.BaseRequest, sock: WsSocket, head: bytes) -> bool:
    """Move the request's connection from aiohttp to `sock`, write `head` (the 101), and
    leave aiohttp nothing of it: its RequestHandler, parser, request and handler task are
    garbage once the handler returns. False when the client has already gone.

    Private aiohttp attributes, written against aiohttp 3.14.5 (web_protocol.py
    RequestHandler: `transport`, `_message_tail`, `_task_handler`, `connection_lost`):
    - bytes that came after the upgrade request are in `_message_tail`: they are ours;
    - `transport = None` first, so that connection_lost's force_close does not close it;
    - `_task_handler = None` first, so that connection_lost neither cancels the running
      handler (we run with handler_cancellation=True) nor defers the Server's forgetting
      of the connection until that task ends: it is dropped from `Server._connections` at
      once, and graceful shutdown no longer waits for it (the hub closes its sockets).
    """
    handler = request.protocol
    transport = handler.transport
    if transport is None or transport.is_closing():
        return False
    tail = handler._message_tail
    handler._message_tail = b""
    transport.set_protocol(sock)
    handler.transport = None
    handler._task_handler = None
    handler.connection_lost(None)
    sock.connection_made(transport)
    transport.write(head)
    # aiohttp pauses reading when bytes pile up behind an upgrade nobody has taken yet.
    if not transport.is_reading():
        transport.resume_reading()
    if tail:
        sock.data_received(tail)
    return True


# -- the socket ----------------------------------------------------------------------------


def _unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """RFC 6455 5.3: XOR with the 4-byte mask, as one big-integer XOR (linear, in C)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _close_frame(code: int, reason: bytes = b"") -> bytes:
    body = _PACK_CODE(code) + reason[:123]  # a control frame's payload is at most 125
    return bytes((0x88, len(body))) + body


class WsSocket(asyncio.Protocol):
    """One client's WebSocket: frames in (checked as RFC 6455 requires of a server), bytes
    out with the transport's flow control, the close handshake, and heartbeat state."""

    __slots__ = ("_buf", "_close_timer", "_frag", "_frag_op", "_idle", "_skip", "closed",
                 "closing", "max_size", "paused", "peer", "transport")

    def __init__(self, peer: Peer, max_size: int) -> None:
        self.peer = peer
        self.max_size = max_size
        self.transport: asyncio.Transport | None = None
        self._buf: bytearray | None = None  # an incomplete frame, when there is one
        self._frag: list[bytes] | None = None  # a fragmented message's frames so far
        self._frag_op = _OP_TEXT
        #: Input bytes still to discard (the rest of a frame we refused); -1: all of it.
        self._skip = 0
        #: Heartbeat periods since the peer last sent anything: 0 heard, 1 silent, 2 pinged.
        self._idle = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self.paused = False  # the transport's buffer is over its high-water mark
        self.closing = False  # our close frame is sent: no more output
        self.closed = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are not asyncio.Transport
        # subclasses, though they are one in every way that counts.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        self._buf = self._frag = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.peer.on_lost()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if not self.closed:
            self.peer.on_writable()

    def data_received(self, data: bytes) -> None:
        self._idle = 0
        skip = self._skip
        if skip:
            if skip < 0 or skip >= len(data):
                if skip > 0:
                    self._skip = skip - len(data)
                return
            self._skip = 0
            data = data[skip:]
        buf = self._buf
        if buf is None:
            used = self._parse(data)
            if used < len(data) and not self._skip:
                self._buf = bytearray(data[used:])
            return
        buf += data
        used = self._parse(buf)
        if used >= len(buf) or self._skip:
            self._buf = None
        elif used:
            del buf[:used]

    # -- output ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closing and self.transport is not None:
            self.transport.write(data)

    def close(self, code: int, reason: bytes = b"") -> None:
        """Start the close handshake: our close frame now, the transport closed when the
        peer's close comes back, or after CLOSE_SEC without it."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.transport.write(_close_frame(code, reason))
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_SEC, self._give_up)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _give_up(self) -> None:
        self._close_timer = None
        transport = self.transport
        if transport is None or self.closed:
            return
        if transport.get_write_buffer_size():
            transport.abort()  # still not read: do not keep its backlog in memory
        else:
            transport.close()

    def beat(self) -> None:
        """One heartbeat period passed (the hub calls this for every socket): a peer silent
        for a whole period is pinged; one still silent a period later is gone."""
        if self.closing:
            return  # its close timer ends it
        idle = self._idle
        if idle == 0:
            self._idle = 1
        elif idle == 1:
            self._idle = 2
            assert self.transport is not None
            self.transport.write(_PING)
        else:
            self.abort()

    # -- input -------------------------------------------------------------------------

    def _parse(self, b: bytes | bytearray) -> int:
        """Handle every whole frame at the start of `b`; how many bytes that used."""
        pos = 0
        end = len(b)
        while end - pos >= 2 and not self.closed:
            b0 = b[pos]
            b1 = b[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (b[pos + 2] << 8) | b[pos + 3]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(b[pos + 2:pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            op = b0 & 0x0F
            fin = b0 & 0x80
            if not self.closing:
                # Checked on the header, before the payload is buffered: a frame over the
                # limit is refused, not read.
                if not masked:
                    self.close(1002, b"client frames must be masked")
                elif b0 & 0x70:
                    self.close(1002, b"reserved bits set")
                elif op >= _OP_CLOSE:
                    if op > _OP_PONG or n > 125 or not fin:
                        self.close(1002, b"bad control frame")
                elif op > _OP_BINARY or (op == _OP_CONT) != (self._frag is not None):
                    self.close(1002, b"bad data frame sequence")
                elif n + (sum(map(len, self._frag)) if self._frag else 0) > self.max_size:
                    self.close(1009, b"message too big")
            if self.closing and (op != _OP_CLOSE or n > 125):
                # Closing: data is discarded while we wait for the peer's close frame.
                if end - pos < head + n:
                    self._skip = head + n - (end - pos)
                    return end
                pos += head + n
                continue
            total = head + n
            if end - pos < total:
                break
            start = pos + head
            payload = (_unmask(b[start - 4:start], b[start:pos + total]) if masked
                       else bytes(b[start:pos + total]))
            pos += total
            if op >= _OP_CLOSE:
                self._control(op, payload)
            else:
                self._data(op, fin, payload)
        return pos

    def _data(self, op: int, fin: int, payload: bytes) -> None:
        if op == _OP_CONT:
            assert self._frag is not None
            self._frag.append(payload)
            if not fin:
                return
            payload = b"".join(self._frag)
            op = self._frag_op
            self._frag = None
        elif not fin:
            self._frag = [payload]
            self._frag_op = op
            return
        if op == _OP_BINARY:
            self.peer.on_binary()
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self.close(1007, b"text frames must be UTF-8")
            return
        self.peer.on_text(text)

    def _control(self, op: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if op == _OP_PING:
            if not self.closing:
                transport.write(bytes((0x8A, len(payload))) + payload)
        elif op == _OP_CLOSE:
            if not self.closing:
                # The peer starts the close: echo its code (RFC 6455 5.5.1), then hang up;
                # a server closes the TCP connection first (7.1.1).
                self.closing = True
                transport.write(_close_frame(*_echo(payload)))
            transport.close()
        # A pong needs nothing: any input (data_received) counts as a sign of life.


def _echo(payload: bytes) -> tuple[int, bytes]:
    """The close frame answering a peer's close `payload`."""
    if not payload:
        return 1000, b""
    code = int.from_bytes(payload[:2], "big")
    if len(payload) < 2 or not (code in _PEER_CODES or 3000 <= code <= 4999):
        return 1002, b"bad close code"
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        return 1007, b"close reason must be UTF-8"
    return code, b""
