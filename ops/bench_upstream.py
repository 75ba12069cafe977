"""A minimal OpenAI-shaped upstream for the chat-path benchmark (`ops/bench_chat.py`).

Raw asyncio (uvloop) over HTTP/1.1 keep-alive, canned bytes only: the benchmark measures the
gateway and the bare pass-through, so the upstream must cost as little CPU per request as
possible and never be the bottleneck. The simulator (`bulwark/sim.py`) is a full aiohttp app with
fault injection, a request log and per-request JSON encoding; this is several times cheaper.

    POST /v1/chat/completions   {"stream": false}  a canned chat.completion (20 words)
                                {"stream": true}   a canned 20-chunk SSE stream: role chunk,
                                                   20 content chunks, finish chunk, [DONE],
                                                   one write (and one HTTP chunk) per event
    GET  /health                200
    GET  /_stats                {"chat": n} requests answered

A streamed request whose body mentions `paced` (the benchmark's model name `paced`) gets its
events `--gap-ms` apart, as a real provider sends tokens, so that each event reaches the
proxy in its own read; any other stream is written back to back.

Only what the benchmark's clients send is understood: requests with Content-Length (aiohttp's
client and wrk both send it), no chunked request bodies, no pipelining beyond in-order replies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import cast

import msgspec

WORDS = 20
# Loopback timers below a millisecond are not kept by libuv; 1 ms is the finest real gap.
DEFAULT_GAP_MS = 1.0

_MODEL = b"sim-1"
_CREATED = b"1700000000"
_TEXT = "".join(("Hello" if i == 0 else " word") for i in range(WORDS))


def _completion() -> bytes:
    return msgspec.json.encode({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
        "model": "sim-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": _TEXT,
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": WORDS, "total_tokens": 12 + WORDS},
        "system_fingerprint": "fp_bench"})


def _events() -> list[bytes]:
    """The SSE events of one answer, each `data: …\\n\\n`, in order."""
    prefix = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":'
              + _CREATED + b',"model":"' + _MODEL + b'","system_fingerprint":"fp_bench",'
              b'"choices":')
    out = [prefix + b'[{"index":0,"delta":{"role":"assistant","content":""},'
                    b'"logprobs":null,"finish_reason":null}]}\n\n']
    for i in range(WORDS):
        word = msgspec.json.encode("Hello" if i == 0 else " word")
        out.append(prefix + b'[{"index":0,"delta":{"content":' + word
                   + b'},"logprobs":null,"finish_reason":null}]}\n\n')
    out.append(prefix + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n')
    out.append(b"data: [DONE]\n\n")
    return out


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


COMPLETION = _completion()
EVENTS = _events()
_JSON_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(COMPLETION))
_JSON_REPLY = _JSON_HEAD + COMPLETION
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
_SSE_CHUNKS = [_chunked(e) for e in EVENTS]
_SSE_END = b"0\r\n\r\n"
_HEALTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Stats:
    def __init__(self) -> None:
        self.chat = 0


class _Conn(asyncio.Protocol):
    """One client connection: parse requests in order, answer each from canned bytes."""

    def __init__(self, stats: Stats, gap: float) -> None:
        self._stats = stats
        self._gap = gap
        self._buf = bytearray()
        self._busy = False  # a paced stream is being written; later requests wait
        self._transport: asyncio.Transport | None = None
        # The loop keeps only weak references to tasks; this one must outlive its writes.
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, only shaped like one.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._drain()

    def _drain(self) -> None:
        while not self._busy and self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end])
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                try:
                    length = int(lower[at + 17: stop if stop >= 0 else None])
                except ValueError:
                    self._transport.write(_BAD)
                    self._transport.close()
                    return
            if len(self._buf) < end + 4 + length:
                return
            body = bytes(self._buf[end + 4: end + 4 + length])
            del self._buf[: end + 4 + length]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        line = head[: head.find(b"\r\n")] if b"\r\n" in head else head
        if line.startswith(b"POST /v1/chat/completions "):
            self._stats.chat += 1
            if b'"stream":true' not in body.replace(b" ", b""):
                self._transport.write(_JSON_REPLY)
            elif b"paced" in body and self._gap > 0:
                self._busy = True
                self._transport.write(_SSE_HEAD)
                self._task = asyncio.get_running_loop().create_task(self._paced())
            else:
                write = self._transport.write
                write(_SSE_HEAD)
                for chunk in _SSE_CHUNKS:
                    write(chunk)
                write(_SSE_END)
        elif line.startswith(b"GET /health"):
            self._transport.write(_HEALTH)
        elif line.startswith(b"GET /_stats"):
            body = b'{"chat":%d}' % self._stats.chat
            self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            self._transport.write(_NOT_FOUND)

    async def _paced(self) -> None:
        try:
            for i, chunk in enumerate(_SSE_CHUNKS):
                if i:
                    await asyncio.sleep(self._gap)
                if self._transport is None:
                    return
                self._transport.write(chunk)
            if self._transport is not None:
                self._transport.write(_SSE_END)
        finally:
            self._busy = False
        self._drain()


async def serve(host: str, port: int, gap_ms: float) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(stats, gap_ms / 1000.0), host, port,
                                      backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_upstream",
                                     description="canned OpenAI upstream for benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--gap-ms", type=float, default=DEFAULT_GAP_MS,
                        help="pause between events of a `paced` stream")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, args.gap_ms))


if __name__ == "__main__":
    main()
