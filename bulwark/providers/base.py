"""What every provider adapter offers, and the HTTP plumbing they share.

An adapter turns one gateway `Call` into one upstream HTTP attempt and back into OpenAI
wire types. It is the boundary where aiohttp's exceptions and the upstream's statuses are
translated, once, into classified `UpstreamError`s (httpx's `map_httpcore_exceptions`).
It never retries and never fails over: the router does, with the error table.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import msgspec

from bulwark.config import Provider
from bulwark.embeddings import EmbedCall, EmbeddingResult
from bulwark.errors import ErrorClass, UpstreamError, classify_status, parse_retry_after, redact
from bulwark.http1 import Http1, Pool, Response
from bulwark.wire import ChatCompletion, ChatRequest, Chunk, any_decoder

C = ErrorClass

#: How much of an error body we read to classify it; the rest is not worth the memory.
ERROR_BODY_LIMIT = 64 * 1024
#: A completion larger than this is not a chat answer; refusing it bounds memory per request.
BODY_LIMIT = 32 * 1024 * 1024


class Call(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream attempt's input."""

    request: ChatRequest
    upstream_model: str
    request_id: str
    #: Headers the client sent that this provider kind forwards (the simulator's `x-sim-*`).
    passthrough: Mapping[str, str] = msgspec.field(default_factory=dict)
    #: The last message is a partial assistant answer for the provider to continue
    #: (stream continuation, `continuation = "prefill"`), not a turn to answer.
    prefill: bool = False
    #: W3C trace context of this attempt's span, sent upstream as `traceparent`.
    traceparent: str | None = None


class Completion(msgspec.Struct, frozen=True):
    """A whole answer: `body` is what the client receives, `parsed` what we account with."""

    body: bytes
    parsed: ChatCompletion


class StreamEvent(msgspec.Struct, array_like=True, gc=False):
    """One chunk: `raw` is the JSON the client receives after `data: `, `chunk` parsed."""

    raw: bytes
    chunk: Chunk
    #: More events of the same network read follow at once: a sink may hold this one
    #: and write them together (no delay: they are already here).
    more: bool = False


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    latency_ms: float
    ttft_ms: float | None = None
    error_class: str | None = None
    status: int | None = None


class Adapter(Protocol):
    provider: Provider

    async def complete(self, call: Call) -> Completion:
        """The whole answer, or raise `UpstreamError`."""
        ...

    def stream(self, call: Call) -> AsyncGenerator[StreamEvent, None]:
        """Chunks in order; the last has a finish_reason (a usage-only chunk may follow).

        Raises `UpstreamError` on any failure, including a stream that ends early.
        """
        ...

    async def embed(self, call: EmbedCall) -> EmbeddingResult:
        """One vector per input, in input order, or raise `UpstreamError` (`unsupported`
        for a provider kind without embeddings, so that the request fails over)."""
        ...

    async def probe(self, *, chat: bool, timeout: float) -> ProbeResult:
        """A cheap health check for healthd; never raises."""
        ...


def translate(err: BaseException, *, phase: str = "") -> UpstreamError:
    """Map one aiohttp / OS exception to a classified upstream error."""
    where = f" ({phase})" if phase else ""
    if isinstance(err, UpstreamError):
        return err
    if isinstance(err, aiohttp.ClientConnectorDNSError):
        return UpstreamError(C.NETWORK_DNS, detail=f"DNS lookup failed{where}")
    if isinstance(err, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError,
                        ssl.SSLError)):
        return UpstreamError(C.NETWORK_TLS, detail=f"TLS failed{where}")
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return UpstreamError(C.TIMEOUT_CONNECT, detail=f"connect timed out{where}")
    if isinstance(err, aiohttp.SocketTimeoutError):
        return UpstreamError(C.TIMEOUT_IDLE, detail=f"no data within the idle timeout{where}")
    if isinstance(err, aiohttp.ClientConnectorError):
        if isinstance(err.os_error, ConnectionRefusedError):
            return UpstreamError(C.NETWORK_REFUSED, detail=f"connection refused{where}")
        detail = f"cannot connect{where}: {err.os_error!r}"
        return UpstreamError(C.NETWORK_REFUSED, detail=detail[:200])
    if isinstance(err, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                        aiohttp.ClientOSError, ConnectionResetError)):
        return UpstreamError(C.NETWORK_RESET, detail=f"connection lost{where}")
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return UpstreamError(C.TIMEOUT_TOTAL, detail=f"timed out{where}")
    if isinstance(err, (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
                        ValueError)):
        return UpstreamError(C.MALFORMED_RESPONSE, detail=f"invalid response{where}: {err}"[:200])
    if isinstance(err, aiohttp.ClientResponseError):
        return UpstreamError(classify_status(err.status), status=err.status, detail="http error")
    if isinstance(err, aiohttp.ClientError):
        return UpstreamError(C.NETWORK_RESET, detail=f"{type(err).__name__}{where}")
    raise err


class Body(Protocol):
    """The reading side of an upstream answer: aiohttp's StreamReader, or a bulwark.http1
    Response."""

    async def readany(self) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...
    async def read(self, n: int = -1) -> bytes: ...
    def iter_any(self) -> AsyncIterator[bytes]: ...


class UpstreamResponse(Protocol):
    """An upstream answer as the adapters read it, from either HTTP client."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> Body: ...
    def release(self) -> object: ...


async def error_from_response(resp: UpstreamResponse, *, retry_after_cap: float,
                              secrets: tuple[str, ...] = ()) -> UpstreamError:
    """Classify a non-2xx upstream response. Its body goes to `detail` (sanitised) only."""
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT)
    except (TimeoutError, aiohttp.ClientError, UpstreamError):
        raw = b""
    text = raw.decode("utf-8", "replace")
    cls = classify_status(resp.status, text)
    client_message: str | None = None
    param: str | None = None
    if cls in (C.BAD_REQUEST, C.CONTEXT_LENGTH, C.CONTENT_POLICY):
        # The caller's own mistake: tell them what the provider said, minus anything secret,
        # and only when it is a JSON error message (never an HTML page or a stack trace).
        try:
            body = any_decoder.decode(raw)
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                client_message = redact(err["message"], secrets)[:500]
                p = err.get("param")
                param = p if isinstance(p, str) else None
            elif isinstance(err, str):
                client_message = redact(err, secrets)[:500]
        except (msgspec.DecodeError, AttributeError):
            pass
    return UpstreamError(
        cls,
        status=resp.status,
        retry_after=parse_retry_after(resp.headers, retry_after_cap),
        detail=f"HTTP {resp.status}: {redact(' '.join(text[:300].split()), secrets)}",
        client_message=client_message,
        param=param,
    )


def client_timeout(provider: Provider, *, idle: bool = True) -> aiohttp.ClientTimeout:
    """Per-attempt socket timeouts. `sock_read` is a stream's idle timeout between reads,
    which aiohttp enforces on the socket (re-armed at every read); first-token and total
    timeouts are applied by the dispatcher around the whole attempt. A whole answer
    (`idle=False`) has no idle timeout: the provider may think for as long as the total
    timeout allows before it sends anything (CONFIGURATION.md: the idle timeout is for
    streams), and the per-read re-arming is saved."""
    t = provider.timeouts
    return aiohttp.ClientTimeout(total=None, sock_connect=t.connect,
                                 sock_read=t.idle if idle else None)


async def _raise_unless_2xx(resp: UpstreamResponse, *, retry_after_cap: float,
                            secrets: tuple[str, ...]) -> None:
    """A non-2xx answer becomes its classified `UpstreamError` (the response released)."""
    if resp.status < 300:
        return
    try:
        failure = await error_from_response(resp, retry_after_cap=retry_after_cap,
                                            secrets=secrets)
    finally:
        resp.release()
    raise failure


#: One ClientTimeout per distinct timeout setting, built once instead of per request.
_TIMEOUTS: dict[tuple[object, bool], aiohttp.ClientTimeout] = {}


class post:  # noqa: N801
    """POST and give a 2xx response; anything else raises a classified `UpstreamError`."""

    __slots__ = ("_args", "_resp", "_retry_after_cap", "_secrets")

    def __init__(self, session: aiohttp.ClientSession, url: str, *, body: bytes,
                 headers: Mapping[str, str], provider: Provider, retry_after_cap: float,
                 secrets: tuple[str, ...] = (), idle: bool = True) -> None:
        timeout = _TIMEOUTS.get((provider.timeouts, idle))
        if timeout is None:
            timeout = _TIMEOUTS[provider.timeouts, idle] = client_timeout(provider, idle=idle)
        self._args = (session, url, body, headers, timeout)
        self._retry_after_cap = retry_after_cap
        self._secrets = secrets
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        session, url, body, headers, timeout = self._args
        try:
            resp = await session.post(url, data=body, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as err:
            raise translate(err) from err
        self._resp = resp
        await _raise_unless_2xx(resp, retry_after_cap=self._retry_after_cap,
                                secrets=self._secrets)
        return resp

    async def __aexit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        assert self._resp is not None
        await self._resp.__aexit__(None, None, None)
        if exc is not None and not isinstance(exc, UpstreamError) and isinstance(
                exc, (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError)):
            raise translate(exc) from exc


class post_http1:  # noqa: N801
    """`post` over bulwark.http1 (the chat path's lean client): the same contract — a 2xx
    response, or a classified `UpstreamError` — at a fifth of the CPU."""

    __slots__ = ("_body", "_client", "_headers", "_idle", "_provider", "_resp",
                 "_retry_after_cap", "_secrets", "_target")

    def __init__(self, client: Http1, target: tuple[Pool, bytes], *, body: bytes,
                 headers: Mapping[str, str], provider: Provider, retry_after_cap: float,
                 secrets: tuple[str, ...] = (), idle: bool = True) -> None:
        self._client = client
        self._target = target
        self._body = body
        self._headers = headers
        self._provider = provider
        self._retry_after_cap = retry_after_cap
        self._secrets = secrets
        self._idle = idle
        self._resp: Response | None = None

    async def __aenter__(self) -> Response:
        t = self._provider.timeouts
        pool, path = self._target
        resp = await self._client.request(pool, path, self._body, self._headers,
                                          connect_timeout=t.connect,
                                          idle=t.idle if self._idle else None)
        self._resp = resp
        await _raise_unless_2xx(resp, retry_after_cap=self._retry_after_cap,
                                secrets=self._secrets)
        return resp

    async def __aexit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        if self._resp is not None:
            self._resp.release()


def _event_data(block: bytes) -> tuple[str, bytes] | None:
    if block.startswith(b"data:") and b"\n" not in block:
        return "", (block[6:] if block[5:6] == b" " else block[5:])
    event, data = "", []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
    return (event, b"\n".join(data)) if data else None


#: An event that is one `data:` line, the form every provider streams its chunks in.
_DATA_EVENT = re.compile(rb"^data: ?(.*)\n\n", re.MULTILINE)
_NO_NAME = itertools.repeat("")


def split_events(buf: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """The complete SSE events at the start of `buf`, and what is left of it."""
    if b"\r" not in buf:
        # The common case in one regex pass (C, not a Python step per event): when every
        # complete event is a single data line, each accounts for exactly two newlines.
        end = buf.rfind(b"\n\n") + 2
        if end < 2:
            return [], buf
        head = buf[:end]
        datas = _DATA_EVENT.findall(head)
        if head.count(b"\n") == 2 * len(datas):
            return list(zip(_NO_NAME, datas, strict=False)), buf[end:]
    return _split_any(buf)


def _split_any(buf: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """split_events for any SSE: named events, comments, multi-line data, CR line ends."""
    if b"\r" in buf:
        buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    blocks = buf.split(b"\n\n")
    rest = blocks.pop()
    out: list[tuple[str, bytes]] = []
    for block in blocks:
        if block[:6] == b"data: " and b"\n" not in block:
            out.append(("", block[6:]))
        else:
            ev = _event_data(block)
            if ev is not None:
                out.append(ev)
    return out, rest


async def read_json_body(resp: UpstreamResponse) -> bytes:
    # Not `content.read(BODY_LIMIT + 1)`: that returns what is buffered so far, which for a
    # large answer (embeddings of many dimensions) is a truncated body.
    length = resp.content_length
    if length is not None and length > BODY_LIMIT:
        raise UpstreamError(C.MALFORMED_RESPONSE, detail="response body over the size limit")
    chunks: list[bytes] = []
    size = 0
    try:
        if length is not None:
            # The common case, in one await: a length-delimited answer within the limit.
            return await resp.content.readexactly(length)
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > BODY_LIMIT:
                raise UpstreamError(C.MALFORMED_RESPONSE,
                                    detail="response body over the size limit")
            chunks.append(chunk)
    except asyncio.IncompleteReadError:
        raise UpstreamError(C.NETWORK_RESET, detail="connection lost (body)") from None
    except (aiohttp.ClientError, OSError) as err:
        raise translate(err, phase="body") from err
    return b"".join(chunks)


async def sse_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, bytes]]:
    """(event, data) pairs of a Server-Sent Events body; `event` is "" when unnamed.

    Multi-line data fields are joined with newlines as the SSE spec says; comments
    (`: keep-alive`) are skipped.
    """
    event = ""
    data: list[bytes] = []
    try:
        async for raw_line in resp.content:
            line = raw_line.rstrip(b"\r\n")
            if not line:
                if data:
                    yield event, b"\n".join(data)
                event, data = "", []
                continue
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
            # id:, retry: and comments carry nothing we use
    except (aiohttp.ClientError, OSError) as err:
        raise translate(err, phase="stream") from err
    if data:
        yield event, b"\n".join(data)


async def probe_get(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                    timeout: float) -> ProbeResult:
    """A GET whose 2xx means alive; classified on failure. Never raises."""
    start = time.perf_counter()
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            ms = (time.perf_counter() - start) * 1000
            if resp.status < 300:
                return ProbeResult(ok=True, latency_ms=ms, status=resp.status)
            cls = classify_status(resp.status)
            return ProbeResult(ok=False, latency_ms=ms, status=resp.status, error_class=str(cls))
    except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as err:
        ms = (time.perf_counter() - start) * 1000
        return ProbeResult(ok=False, latency_ms=ms, error_class=str(translate(err).cls))
