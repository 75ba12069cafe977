"""bulwark/http1.py against real sockets: a scripted server writes exactly the bytes each
test wants (framing split anywhere, chunked, gzip, cut connections, stalls)."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bulwark.errors import ErrorClass as C
from bulwark.errors import UpstreamError
from bulwark.http1 import Http1, Response


class Server:
    """Accepts connections; each request is answered by `answer(request_bytes, writer)`."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.answer: Callable[[bytes, asyncio.StreamWriter], object] = lambda r, w: None
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                result = self.answer(head + body, writer)
                if asyncio.iscoroutine(result):
                    await result
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def client() -> AsyncIterator[Http1]:
    c = Http1(limit_per_origin=4, keepalive_sec=30)
    yield c
    c.close()


async def post(client: Http1, server: Server, *, idle: float | None = None,
               headers: dict[str, str] | None = None) -> Response:
    pool, path = client.target(f"http://127.0.0.1:{server.port}/v1/chat/completions")
    return await client.request(pool, path, b'{"hello":1}', headers or {}, connect_timeout=2,
                                idle=idle)


def reply(*parts: bytes, pause: float = 0.0) -> Callable[[bytes, asyncio.StreamWriter], object]:
    async def write(_: bytes, w: asyncio.StreamWriter) -> None:
        for part in parts:
            w.write(part)
            await w.drain()
            if pause:
                await asyncio.sleep(pause)
    return write


async def test_length_delimited_answer_and_keep_alive(client: Http1, server: Server) -> None:
    server.answer = reply(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 7\r\n\r\n{\"a\":1}")
    for _ in range(3):
        async with await post(client, server, headers={"X-Request-Id": "r1"}) as resp:
            assert resp.status == 200
            assert resp.headers.get("content-type") == "application/json"
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.content_length == 7
            assert await resp.content.readexactly(7) == b'{"a":1}'
    assert server.connections == 1  # one connection, kept alive between whole answers
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nX-Request-Id: r1\r\n" in first and b"\r\nContent-Length: 11\r\n" in first
    assert first.endswith(b'\r\n\r\n{"hello":1}')


async def test_chunked_answer_split_anywhere(client: Http1, server: Server) -> None:
    body = b"data: one\n\ndata: two\n\n"
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"b\r\n" + body[:11] + b"\r\n" + b"%x;ext=1\r\n" % (len(body) - 11)
            + body[11:] + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
    # One byte per write: every state of the chunk parser meets a boundary.
    server.answer = reply(*[wire[i:i + 1] for i in range(len(wire))])
    async with await post(client, server) as resp:
        got = b"".join([piece async for piece in resp.content.iter_any()])
    assert got == body
    async with await post(client, server) as resp:
        assert await resp.content.read() == body
    assert server.connections == 1


async def test_gzip_answer_is_decoded(client: Http1, server: Server) -> None:
    packed = gzip.compress(b'{"x":"' + b"y" * 5000 + b'"}')
    server.answer = reply(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(packed) + packed)
    async with await post(client, server) as resp:
        assert await resp.content.read() == b'{"x":"' + b"y" * 5000 + b'"}'


async def test_interim_answer_then_the_real_one(client: Http1, server: Server) -> None:
    server.answer = reply(b"HTTP/1.1 100 Continue\r\n\r\n",
                          b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with await post(client, server) as resp:
        assert (resp.status, await resp.content.read()) == (200, b"ok")


async def test_answer_ended_by_close_is_not_reused(client: Http1, server: Server) -> None:
    async def until_close(_: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()
        w.close()
    server.answer = until_close
    for _ in range(2):
        async with await post(client, server) as resp:
            assert await resp.content.read() == b"all of it"
    assert server.connections == 2


async def test_cut_in_the_body_is_a_network_reset(client: Http1, server: Server) -> None:
    async def cut(_: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()
        w.close()
    server.answer = cut
    for read in ("readexactly", "read"):
        async with await post(client, server) as resp:
            with pytest.raises(UpstreamError) as info:
                if read == "read":
                    await resp.content.read()
                else:
                    await resp.content.readexactly(100)
        assert info.value.cls is C.NETWORK_RESET


async def test_cut_before_the_answer_is_a_network_reset(client: Http1, server: Server) -> None:
    async def hang_up(_: bytes, w: asyncio.StreamWriter) -> None:
        w.close()
    server.answer = hang_up
    with pytest.raises(UpstreamError) as info:
        await post(client, server)
    assert info.value.cls is C.NETWORK_RESET


@pytest.mark.parametrize("wire", [b"SMTP ready\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
async def test_malformed_answers(client: Http1, server: Server, wire: bytes) -> None:
    server.answer = reply(wire)
    with pytest.raises(UpstreamError) as info:
        async with await post(client, server) as resp:
            await resp.content.read()
    assert info.value.cls is C.MALFORMED_RESPONSE


async def test_stall_is_an_idle_timeout(client: Http1, server: Server) -> None:
    server.answer = reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\nfirst\r\n", pause=5)
    async with await post(client, server, idle=0.2) as resp:
        assert await resp.content.readany() == b"first"
        with pytest.raises(UpstreamError) as info:
            await resp.content.readany()
    assert info.value.cls is C.TIMEOUT_IDLE


async def test_refused_connection(client: Http1) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    pool, path = client.target(f"http://127.0.0.1:{port}/x")
    with pytest.raises(UpstreamError) as info:
        await client.request(pool, path, b"", {}, connect_timeout=2, idle=None)
    assert info.value.cls is C.NETWORK_REFUSED


async def test_a_header_with_a_line_break_is_never_sent(client: Http1, server: Server) -> None:
    with pytest.raises(UpstreamError) as info:
        await post(client, server, headers={"Authorization": "Bearer k\r\nX-Evil: 1"})
    assert info.value.cls is C.BAD_REQUEST
    assert server.requests == []


async def test_connections_per_origin_are_bounded(server: Server) -> None:
    client = Http1(limit_per_origin=2)
    gate = asyncio.Event()

    async def slow(_: bytes, w: asyncio.StreamWriter) -> None:
        await gate.wait()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server.answer = slow

    async def one() -> bytes:
        async with await post(client, server) as resp:
            return await resp.content.read()

    try:
        tasks = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert server.connections == 2  # the third waits for a connection to come back
        gate.set()
        assert await asyncio.gather(*tasks) == [b"ok"] * 3
        assert server.connections == 2
    finally:
        client.close()


async def test_an_answer_left_unread_closes_its_connection(client: Http1,
                                                            server: Server) -> None:
    server.answer = reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    async with await post(client, server) as resp:
        assert resp.status == 200  # body never read: the connection cannot be reused
    async with await post(client, server) as resp:
        assert await resp.content.read() == b"hello"
    assert server.connections == 2


async def test_tls_with_the_trusted_certificate_and_not_without(tmp_path: Path) -> None:
    """https origins: the certificate is verified (a self-signed one only when trusted)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    tls = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = tls.sockets[0].getsockname()[1]
    trusting = Http1(ssl_context=ssl.create_default_context(cafile=str(cert)))
    system = Http1()
    try:
        pool, path = trusting.target(f"https://127.0.0.1:{port}/v1/chat/completions")
        async with await trusting.request(pool, path, b"", {}, connect_timeout=5,
                                          idle=None) as resp:
            assert await resp.content.read() == b"secret"
        pool, path = system.target(f"https://127.0.0.1:{port}/v1/chat/completions")
        with pytest.raises(UpstreamError) as info:
            await system.request(pool, path, b"", {}, connect_timeout=5, idle=None)
        assert info.value.cls is C.NETWORK_TLS
    finally:
        trusting.close()
        system.close()
        tls.close()
