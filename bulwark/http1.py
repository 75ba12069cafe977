"""A lean HTTP/1.1 client for the chat path: keep-alive connections per origin, one write
per request, the response parsed from the socket's bytes as they come.

Why not aiohttp's client here: measured in one process against the same canned upstream,
a POST and its JSON answer cost 81–83 µs of CPU through `ClientSession.post` (request and
response objects, header multidicts, URL handling, timers, payload wrappers, tracing
hooks) and 15–17 µs this way, system calls included — most of what the gateway costs
beyond a bare proxy (docs/PERFORMANCE.md). aiohttp's client stays for everything else
(embeddings, probes, Anthropic, Gemini, webhooks), where its generality is worth more
than its cost.

What it does: `POST` with a body, `Content-Length` or chunked answers (or an answer that
ends with the connection), gzip/deflate if a server sends it unasked (we never ask),
TLS with the system's trust store, a connect timeout, a stream's idle timeout on one
shared timer (bulwark/deadline.py), at most `limit` connections per origin, idle ones
kept `keepalive_sec`. Every failure is an `UpstreamError` of the same class aiohttp's
would have been translated to (base.translate), so retries, failover and breakers see no
difference. A response not read to its end, or cancelled, closes its connection: a
connection goes back to the pool only between two whole answers.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from types import TracebackType
from typing import Final
from urllib.parse import urlsplit

from bulwark.deadline import Deadlines
from bulwark.errors import ErrorClass as C
from bulwark.errors import UpstreamError

#: Response head (status line and headers) larger than this is not an HTTP answer we take.
MAX_HEAD: Final = 64 * 1024
#: A chunk-size line longer than this is malformed (real ones are a few hex digits).
MAX_SIZE_LINE: Final = 4096
#: Stop reading from the socket while this much is waiting for the reader; go on below LOW.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
#: Sent with every request, right after `Host` (one constant line, built once).
_USER_AGENT_LINE: Final = b"\r\nUser-Agent: bulwark\r\n"

_LENGTH, _CHUNKED, _UNTIL_CLOSE, _EMPTY = 0, 1, 2, 3
#: Chunked-body states beyond "bytes left in this chunk" (> 0).
_SIZE_LINE, _CHUNK_END, _TRAILERS = 0, -1, -2


def _reset(detail: str) -> UpstreamError:
    return UpstreamError(C.NETWORK_RESET, detail=f"connection lost ({detail})")


def _malformed(detail: str) -> UpstreamError:
    return UpstreamError(C.MALFORMED_RESPONSE, detail=f"invalid HTTP response: {detail}"[:200])


def _chunk_size(line: bytes) -> int:
    """A chunk-size line's size (extensions after `;` ignored), strictly hex digits."""
    semi = line.find(b";")
    digits = (line if semi < 0 else line[:semi]).strip()
    if not digits or digits.strip(b"0123456789abcdefABCDEF"):
        raise _malformed("chunk size is not hex")
    return int(digits, 16)


class Headers(Mapping[str, str]):
    """A response's headers: names lower-cased, looked up in any case; a repeated header
    keeps its last value (nothing here reads a list-valued one)."""

    __slots__ = ("_d",)

    def __init__(self, d: dict[str, str]) -> None:
        self._d = d

    def __getitem__(self, key: str) -> str:
        return self._d[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


class _Conn(asyncio.Protocol):
    """One keep-alive connection: bytes in, a waiter woken when more arrive or it ends."""

    __slots__ = ("buf", "closed", "eof", "idle_since", "paused", "pool", "transport",
                 "waiter")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.eof = False
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is one in all but name

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.closed = True
        self._wake()
        self.pool.forget(self)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def consumed(self) -> None:
        """The reader took bytes: read from the socket again once the backlog is small."""
        if self.paused and len(self.buf) < LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    async def wait(self, idle: float | None) -> None:
        """Until more bytes or the end arrive; UpstreamError(timeout_idle) after `idle`."""
        self.consumed()
        waiter = self.waiter = self.pool.loop.create_future()
        if idle is None:
            await waiter
            return
        try:
            with self.pool.deadlines.after(idle):
                await waiter
        except TimeoutError:
            raise UpstreamError(C.TIMEOUT_IDLE,
                                detail="no data within the idle timeout") from None

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.forget(self)


class Response:
    """An upstream answer: `status`, `headers`, and its body read as it arrives. `content`
    is the response itself (the reading methods aiohttp's `StreamReader` has, that we use)."""

    __slots__ = ("_chunk", "_conn", "_decoder", "_done", "_idle", "_left", "_mode",
                 "_reusable", "content_length", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: Headers, *, idle: float | None,
                 closes: bool) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers
        self._idle = idle
        self._done = False
        self._reusable = not closes
        self._chunk = _SIZE_LINE
        self._left = 0
        self.content_length: int | None = None
        te = headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        if status in (204, 304) or 100 <= status < 200:
            self._mode = _EMPTY
        elif "chunked" in te:
            self._mode = _CHUNKED
        elif length is not None:
            try:
                self._left = self.content_length = int(length)
            except ValueError:
                raise _malformed("Content-Length is not a number") from None
            if self._left < 0:
                raise _malformed("negative Content-Length")
            self._mode = _LENGTH
        else:
            self._mode = _UNTIL_CLOSE
            self._reusable = False
        if self._mode == _EMPTY or (self._mode == _LENGTH and self._left == 0):
            self._done = True
        encoding = headers.get("content-encoding", "").lower()
        self._decoder = (zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else
                         zlib.decompressobj() if encoding == "deflate" else None)

    @property
    def content(self) -> Response:
        return self

    # -- reading ----------------------------------------------------------------------

    async def readany(self) -> bytes:
        """What has arrived of the body (decoded), waiting for some if none; b"" at its end."""
        while True:
            if self._done:
                return self._flush_decoder()
            data = self._take()
            if data:
                if self._decoder is not None:
                    data = self._decode(data)
                    if not data:
                        continue
                return data
            if self._ended():  # _take() may have reached the end without new bytes
                continue
            conn = self._conn
            if conn.eof:
                if self._mode == _UNTIL_CLOSE:
                    self._done = True
                    continue
                raise _reset("body")
            await conn.wait(self._idle)

    def _ended(self) -> bool:
        return self._done

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            piece = await self.readany()
            if not piece:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(piece)
            got += len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if got > n:  # a decoded body may come in larger pieces than asked for
            raise _malformed("body longer than its Content-Length")
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes of the body (all of it when n < 0)."""
        parts: list[bytes] = []
        got = 0
        while n < 0 or got < n:
            piece = await self.readany()
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        data = b"".join(parts)
        return data if n < 0 else data[:n]

    async def iter_any(self) -> AsyncIterator[bytes]:
        while piece := await self.readany():
            yield piece

    def _take(self) -> bytes:
        conn = self._conn
        buf = conn.buf
        if not buf:
            return b""
        mode = self._mode
        if mode == _LENGTH:
            n = min(self._left, len(buf))
            data = bytes(buf[:n])
            del buf[:n]
            self._left -= n
            if not self._left:
                self._done = True
        elif mode == _UNTIL_CLOSE:
            data = bytes(buf)
            buf.clear()
        else:
            data = self._take_chunks(buf)
        conn.consumed()
        return data

    def _take_chunks(self, buf: bytearray) -> bytes:
        """The data of every whole chunk (and the start of a partial one) in `buf`. One copy
        and one cut of the buffer per call, positions in between: a stream's every event
        is a chunk of its own, and a read brings many."""
        b = bytes(buf)
        end = len(b)
        pos = 0
        state = self._chunk
        out: list[bytes] = []
        while pos < end:
            if state > 0:
                n = min(state, end - pos)
                out.append(b[pos:pos + n])
                pos += n
                state = state - n or _CHUNK_END
            elif state == _CHUNK_END:
                if end - pos < 2:
                    break
                if b[pos:pos + 2] != b"\r\n":
                    raise _malformed("chunk not followed by CRLF")
                pos += 2
                state = _SIZE_LINE
            elif state == _SIZE_LINE:
                eol = b.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_SIZE_LINE:
                        raise _malformed("chunk size line too long")
                    break
                state = _chunk_size(b[pos:eol])
                pos = eol + 2
                if state == 0:
                    state = _TRAILERS
            else:  # trailers, ended by an empty line
                if b[pos:pos + 2] == b"\r\n":
                    pos += 2
                    self._done = True
                    break
                eot = b.find(b"\r\n\r\n", pos)
                if eot < 0:
                    if end - pos > MAX_HEAD:
                        raise _malformed("trailers too long")
                    break
                pos = eot + 4
                self._done = True
                break
        del buf[:pos]
        self._chunk = state
        return out[0] if len(out) == 1 else b"".join(out)

    def _decode(self, data: bytes) -> bytes:
        assert self._decoder is not None
        try:
            return self._decoder.decompress(data)
        except zlib.error as err:
            raise _malformed(f"body does not decompress: {err}") from None

    def _flush_decoder(self) -> bytes:
        if self._decoder is None:
            return b""
        decoder, self._decoder = self._decoder, None
        try:
            return decoder.flush()
        except zlib.error as err:
            raise _malformed(f"body does not decompress: {err}") from None

    # -- the connection ---------------------------------------------------------------

    def release(self) -> None:
        """Done with it: a whole answer's connection goes back to the pool, any other closes."""
        conn = self._conn
        if self._done and self._reusable and not conn.buf and not conn.eof:
            conn.pool.put(conn)
        else:
            conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class Pool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    def __init__(self, scheme: str, host: str, port: int, *, limit: int,
                 keepalive_sec: float, ssl_context: ssl.SSLContext | None,
                 deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        self.host, self.port = host, port
        self.ssl = ssl_context if scheme == "https" else None
        default = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self.host_header = (name if port == default else f"{name}:{port}").encode("idna")
        self.limit = limit
        self.keepalive_sec = keepalive_sec
        self.deadlines = deadlines
        self.loop = loop
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def connection(self, connect_timeout: float) -> _Conn:
        """An idle connection still fresh, or a new one (waiting while `limit` are open)."""
        now = self.loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if (conn.closed or conn.eof or conn.buf
                    or now - conn.idle_since > self.keepalive_sec):
                # Gone, sent something nobody asked for, or idle longer than servers keep
                # a connection: a new one rather than a reset on the next request.
                conn.close()
                continue
            return conn
        while len(self._open) >= self.limit:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the turn goes to the next
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._idle:
                return await self.connection(connect_timeout)
        conn = _Conn(self)
        self._open.add(conn)
        try:
            with self.deadlines.after(connect_timeout):
                await self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None)
        except BaseException as err:
            self.forget(conn)
            raise _connect_error(err) from err
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def put(self, conn: _Conn) -> None:
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake_one()

    def forget(self, conn: _Conn) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


def _connect_error(err: BaseException) -> BaseException:
    if isinstance(err, UpstreamError | asyncio.CancelledError):
        return err
    if isinstance(err, TimeoutError):
        return UpstreamError(C.TIMEOUT_CONNECT, detail="connect timed out")
    if isinstance(err, socket.gaierror):
        return UpstreamError(C.NETWORK_DNS, detail="DNS lookup failed")
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return UpstreamError(C.NETWORK_TLS, detail="TLS failed")
    if isinstance(err, ConnectionRefusedError):
        return UpstreamError(C.NETWORK_REFUSED, detail="connection refused")
    if isinstance(err, OSError):
        return UpstreamError(C.NETWORK_REFUSED, detail=f"cannot connect: {err!r}"[:200])
    return err


def _header_line(name: str, value: str) -> bytes:
    if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
        # Never let a value end the header block: a request we will not send is a bug of
        # the configuration (an API key with a newline), not the provider's fault.
        raise UpstreamError(C.BAD_REQUEST, detail=f"header {name[:40]!r} has a line break")
    return f"{name}: {value}\r\n".encode("latin-1", "replace")


class Http1:
    """Every origin's pool, for one event loop; `close()` when the process stops."""

    def __init__(self, *, limit_per_origin: int = 500, keepalive_sec: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.limit = limit_per_origin
        self.keepalive_sec = keepalive_sec
        self.deadlines = Deadlines()
        self._pools: dict[tuple[str, str, int], Pool] = {}
        #: None: the system's trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured), built
        #: at the first https origin.
        self._ssl = ssl_context

    def pool(self, scheme: str, host: str, port: int) -> Pool:
        key = (scheme, host, port)
        pool = self._pools.get(key)
        if pool is None:
            if scheme == "https" and self._ssl is None:
                self._ssl = ssl.create_default_context()
            pool = self._pools[key] = Pool(
                scheme, host, port, limit=self.limit, keepalive_sec=self.keepalive_sec,
                ssl_context=self._ssl, deadlines=self.deadlines, loop=self.deadlines.loop())
        return pool

    def target(self, url: str) -> tuple[Pool, bytes]:
        """The pool and request target of an http(s) URL (looked up once per adapter)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return self.pool(parts.scheme, parts.hostname, port), path.encode()

    async def request(self, pool: Pool, path: bytes, body: bytes, headers: Mapping[str, str],
                      *, connect_timeout: float, idle: float | None) -> Response:
        """Send one POST and read its response's head; the body is read from the result."""
        conn = await pool.connection(connect_timeout)
        try:
            head = [b"POST ", path, b" HTTP/1.1\r\nHost: ", pool.host_header, _USER_AGENT_LINE]
            head += [_header_line(k, v) for k, v in headers.items()]
            head.append(b"Content-Length: %d\r\n\r\n" % len(body))
            head.append(body)
            assert conn.transport is not None
            conn.transport.write(b"".join(head))
            return await _read_head(conn, idle)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


async def _read_head(conn: _Conn, idle: float | None) -> Response:
    while True:
        buf = conn.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise _malformed("response head too long")
            if conn.eof:
                raise _reset("before the response")
            await conn.wait(idle)
            continue
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[:end + 4]
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
            raise _malformed(f"status line {status_line[:40]!r}")
        try:
            status = int(status_line[9:12])
        except ValueError:
            raise _malformed(f"status line {status_line[:40]!r}") from None
        if 100 <= status < 200:
            continue  # an interim answer (we never ask for one): the real one follows
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _malformed("header line without a colon")
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        headers = Headers(fields)
        closes = (headers.get("connection", "").lower() == "close"
                  or status_line.startswith(b"HTTP/1.0"))
        return Response(conn, status, headers, idle=idle, closes=closes)
