"""The WebSocket after its upgrade (service/wsconn.py), on the wire: a raw asyncio client
writes frames by hand — fragmented, unmasked, oversize, bad UTF-8 — against a real
gateway, and reads what comes back. Also pins that aiohttp lets go of the connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bulwark.config import Settings
from bulwark.sim import reply_text
from service.keys import WS
from tests.conftest import Gateway, GatewayFactory, SimFactory
from tests.pg import eventually
from tests.test_ws import chat, two

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10


def frame(op: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
          rsv: int = 0, length: int | None = None) -> bytes:
    """One client frame as RFC 6455 5.2 lays it out; `length` may lie about the size."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | op])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Raw:
    """A hand-driven client socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload); server frames are whole and unmasked."""
        async with asyncio.timeout(10):
            b0, b1 = await self.reader.readexactly(2)
            assert b1 & 0x80 == 0 and b0 & 0x80, (b0, b1)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def json(self) -> dict[str, Any]:
        while True:
            op, payload = await self.recv()
            if op == TEXT:
                out: dict[str, Any] = json.loads(payload)
                return out
            assert op in (PING, PONG), (op, payload)

    async def closed_with(self) -> int:
        """Read to the server's close frame, answer it, and see the connection end: the
        close code."""
        while True:
            op, payload = await self.recv()
            if op == CLOSE:
                break
        self.send(frame(CLOSE, payload[:2]))
        async with asyncio.timeout(10):
            assert await self.reader.read() == b""
        return int.from_bytes(payload[:2], "big")

    async def until_done(self, cid: str) -> list[dict[str, Any]]:
        frames = [await self.json()]
        while frames[-1]["type"] not in ("done", "error") or frames[-1].get("id") != cid:
            frames.append(await self.json())
        return frames


_opened: list[Raw] = []


@pytest.fixture(autouse=True)
async def _close_raw() -> AsyncIterator[None]:
    yield
    while _opened:
        raw = _opened.pop()
        raw.writer.close()
        with contextlib.suppress(ConnectionError):
            await raw.writer.wait_closed()


async def connect(gw: Gateway, *, then: bytes = b"") -> Raw:
    """Upgrade a raw connection; `then` goes out in the same write as the request."""
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    _opened.append(Raw(reader, writer))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode() + then)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"x-request-id: " in head
    return _opened[-1]


@pytest.fixture
async def gw(sim: SimFactory, gateway: GatewayFactory) -> Gateway:
    _, _, gw = await two(sim, gateway, settings=Settings(http_backoff_base_ms=0,
                                                         ws_max_frame_bytes=4096))
    return gw


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(c["delta"].get("content") or "" for f in frames if f["type"] == "delta"
                   for c in f["chunk"]["choices"])


def alive(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_aiohttp_lets_go_of_the_connection(gw: Gateway) -> None:
    """After the upgrade aiohttp holds nothing of a socket (no RequestHandler or request
    stays alive, the server lists no connection), bytes sent with the upgrade request are
    ours, and the socket still chats. Fails if aiohttp 3.14.5's internals that
    service/wsconn.py `detach` relies on change."""
    assert gw.server.runner is not None
    server = gw.server.runner.server
    assert server is not None
    handlers, requests = alive(RequestHandler), alive(web.BaseRequest)
    socks = [await connect(gw, then=frame(PING, b"early")) for _ in range(5)]
    for sock in socks:
        assert await sock.recv() == (PONG, b"early")
    assert alive(RequestHandler) <= handlers and alive(web.BaseRequest) <= requests
    assert server.connections == []
    assert len(gw.app[WS].sockets) == 5
    sock = socks[0]
    sock.send(frame(TEXT, json.dumps(chat("a", max_tokens=4)).encode()))
    frames = await sock.until_done("a")
    assert frames[-1]["type"] == "done" and text_of(frames) == reply_text("alpha", 4)
    for s in socks:
        s.writer.close()
        await s.writer.wait_closed()
    await eventually(lambda: not gw.app[WS].sockets)


async def test_fragmented_text_with_a_ping_between(gw: Gateway) -> None:
    """A text message in three frames, with a ping between two of them, is one chat
    frame; the ping is answered with its payload at once."""
    sock = await connect(gw)
    data = json.dumps(chat("f", max_tokens=3)).encode()
    sock.send(frame(TEXT, data[:10], fin=False))
    sock.send(frame(CONT, data[10:20], fin=False))
    sock.send(frame(PING, b"hello"))
    assert await sock.recv() == (PONG, b"hello")
    sock.send(frame(CONT, data[20:]))
    frames = await sock.until_done("f")
    assert frames[0]["type"] == "ack"
    assert frames[-1]["type"] == "done" and text_of(frames) == reply_text("alpha", 3)


@pytest.mark.parametrize(("bad", "code"), [
    (frame(TEXT, b'{"type":"cancel","id":"x"}', mask=False), 1002),
    (frame(TEXT, b"{}", rsv=4), 1002),
    (frame(CONT, b"{}"), 1002),
    (frame(PING, b"x" * 126), 1002),
    (frame(PING, b"x", fin=False), 1002),
    (frame(11, b""), 1002),
    (frame(TEXT, b'{"type": "\xff"}'), 1007),
    (frame(TEXT, b"x" * 5000), 1009),
    (frame(TEXT, b"x" * 3000, fin=False) + frame(CONT, b"x" * 3000), 1009),
], ids=["unmasked", "reserved-bits", "stray-continuation", "long-ping", "fragmented-ping",
        "unknown-opcode", "bad-utf8", "oversize", "oversize-in-fragments"])
async def test_protocol_errors_close_with_their_code(gw: Gateway, bad: bytes,
                                                     code: int) -> None:
    """A frame RFC 6455 forbids closes with 1002, a text frame that is not UTF-8 with
    1007, a message over ws_max_frame_bytes with 1009 (refused on its header, not read)."""
    sock = await connect(gw)
    sock.send(bad)
    assert await sock.closed_with() == code
    await eventually(lambda: not gw.app[WS].sockets)


async def test_binary_frame_is_an_error_frame_and_close_is_echoed(gw: Gateway) -> None:
    """A binary frame gets an invalid_frame error and the socket stays; the client's close
    is echoed with its code, and the server hangs up."""
    sock = await connect(gw)
    sock.send(frame(BINARY, b"\x00\x01"))
    assert (await sock.json())["error"]["code"] == "invalid_frame"
    sock.send(frame(CLOSE, struct.pack("!H", 4001) + b"bye"))
    assert await sock.recv() == (CLOSE, struct.pack("!H", 4001))
    async with asyncio.timeout(10):
        assert await sock.reader.read() == b""
    await eventually(lambda: not gw.app[WS].sockets)


async def test_heartbeat_drops_a_peer_that_never_answers(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """With a short heartbeat: a silent peer is pinged; one that answers with a pong
    stays, one that never answers is dropped (EOF) after the next period."""
    _, _, gw = await two(sim, gateway, settings=Settings(http_backoff_base_ms=0,
                                                         ws_heartbeat_sec=0.2))
    deaf, polite = await connect(gw), await connect(gw)

    async def answer_pings() -> None:
        while True:
            op, payload = await polite.recv()
            if op == PING:
                polite.send(frame(PONG, payload))

    ponger = asyncio.create_task(answer_pings())
    try:
        assert await deaf.recv() == (PING, b"")
        async with asyncio.timeout(5):
            assert await deaf.reader.read() == b""  # no pong: dropped, no close frame
        await asyncio.sleep(1.0)  # five periods: the polite one is still there
        assert len(gw.app[WS].sockets) == 1
        polite.send(frame(TEXT, json.dumps(chat("h", max_tokens=2)).encode()))
    finally:
        ponger.cancel()
        await asyncio.gather(ponger, return_exceptions=True)
    frames = await polite.until_done("h")
    assert frames[-1]["type"] == "done"
