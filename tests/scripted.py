"""A scripted fake upstream: a real aiohttp server that answers from a list of `Reply`s.

Each request takes the next reply (the last one repeats), so a status sequence such as
`[503, 503, 200]` is three `Reply`s. Every request is recorded (method, path, query,
headers, body) in `app[REQUESTS]`, so tests assert on what an adapter actually sent, and
count attempts at the upstream. Nothing here knows any provider's wire format.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted answer.

    `sse` (events written one by one, verbatim: frame them with `sse_event`) wins over
    `body`. `reset` aborts the connection with a TCP RST: before anything is sent when
    there are no events, after the events otherwise (a stream cut mid-way). `stall`
    keeps the connection open after the events, sending nothing, until the client leaves.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    sse: Sequence[bytes] | None = None
    #: Seconds before the status line is sent (a slow first byte).
    delay: float = 0.0
    #: Seconds before each SSE event.
    event_delay: float = 0.0
    reset: bool = False
    stall: bool = False

    @classmethod
    def json(cls, obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None,
             ) -> Reply:
        """A JSON body (msgspec-encoded, so Structs work too)."""
        return cls(status=status, headers={"Content-Type": "application/json", **(headers or {})},
                   body=_encoder.encode(obj))


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream saw it (headers case-insensitive)."""

    method: str
    path: str
    query_string: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


REQUESTS = web.AppKey("REQUESTS", list[Recorded])
REPLIES = web.AppKey("REPLIES", list[Reply])


def sse_event(data: bytes | str | Any, *, event: str | None = None) -> bytes:
    """One Server-Sent Event: `data` as is when bytes/str, else JSON-encoded."""
    if isinstance(data, str):
        payload = data.encode()
    elif isinstance(data, bytes):
        payload = data
    else:
        payload = _encoder.encode(data)
    head = f"event: {event}\n".encode() if event else b""
    lines = b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n"))
    return head + lines + b"\n"


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns close into a RST: what a crashed proxy or a dropped NAT entry sends.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _until_client_leaves(request: web.Request) -> None:
    # aiohttp does not cancel handlers when the peer goes away, so watch the transport;
    # the bound keeps a forgotten stall from holding the test server open indefinitely.
    for _ in range(3000):
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.02)


async def _handle(request: web.Request) -> web.StreamResponse:
    app = request.app
    body = await request.read()
    app[REQUESTS].append(Recorded(
        method=request.method,
        path=request.path,
        query_string=request.query_string,
        headers=CIMultiDict(request.headers),
        body=body,
    ))
    replies = app[REPLIES]
    reply = replies.pop(0) if len(replies) > 1 else replies[0]
    if reply.delay:
        await asyncio.sleep(reply.delay)
    if reply.reset and reply.sse is None:
        _abort(request)
        return web.Response()  # never sent: the connection is gone
    if reply.sse is None:
        headers = {"Content-Type": "application/json", **reply.headers}
        return web.Response(status=reply.status, headers=headers, body=reply.body)
    resp = web.StreamResponse(status=reply.status,
                              headers={"Content-Type": "text/event-stream", **reply.headers})
    await resp.prepare(request)
    for event in reply.sse:
        if reply.event_delay:
            await asyncio.sleep(reply.event_delay)
        await resp.write(event)
    if reply.reset:
        _abort(request)
        return resp
    if reply.stall:
        await _until_client_leaves(request)
        return resp
    await resp.write_eof()
    return resp


def scripted_app(replies: Sequence[Reply]) -> web.Application:
    """An app answering any method and path from `replies`, in order, the last repeating."""
    if not replies:
        raise ValueError("a scripted upstream needs at least one reply")
    app = web.Application()
    app[REQUESTS] = []
    app[REPLIES] = list(replies)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


def refused_url(path: str = "/v1") -> str:
    """A loopback URL on which nothing listens: connecting is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Closed without listen(): the kernel answers a SYN to this port with a RST.
    return f"http://127.0.0.1:{port}{path}"


@dataclass(frozen=True)
class Upstream:
    """A running scripted upstream."""

    server: TestServer
    app: web.Application

    def url(self, path: str = "/v1") -> str:
        return str(self.server.make_url(path))

    @property
    def requests(self) -> list[Recorded]:
        return self.app[REQUESTS]


async def start_upstream(aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
                         replies: Sequence[Reply]) -> Upstream:
    """Serve `replies` on a loopback port with pytest-aiohttp's `aiohttp_server` fixture."""
    app = scripted_app(replies)
    return Upstream(await aiohttp_server(app), app)
