"""OTLP/HTTP with JSON encoding: a `SpanExporter` for the SDK's batch processor.

Why not the SDK's own OTLP/HTTP exporter: it builds a protobuf object per span, attribute
and value in Python and posts through `requests`, ~120 µs of CPU per traced request (two
spans) on the processor's thread — the same process, the same GIL as the event loop
(`ops/bench_tracing.py`). This one writes a batch in OTLP's JSON form
(https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding: lowerCamelCase keys,
trace and span ids as hex, enums as integers, 64-bit integers as decimal strings) with
msgspec and posts it on one kept-alive `http.client` connection.

It runs on the batch processor's thread only, so it never blocks or fails a request. A
batch gets one deadline (the smaller of `OTEL_EXPORTER_OTLP_TIMEOUT` and
`OTEL_BSP_EXPORT_TIMEOUT`); within it, a 429/502/503/504 or a refused/reset connection is
tried again after a jittered backoff (a `Retry-After` in seconds is honoured), at most
`MAX_TRIES` times. Whatever still fails is dropped with a warning (at most one a minute):
traces are worth less than the requests they describe. Nothing here raises into the
processor.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import math
import random
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("bulwark.telemetry")

#: Tries per batch (the first and three more): with the backoff below that spans about
#: 3.5 s, the SDK exporter's order of patience, and well inside the default 10 s deadline.
MAX_TRIES: Final = 4
BACKOFF_SEC: Final = 0.5
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
#: A collector that stays down would otherwise log once per batch (every 5 s or faster).
WARN_EVERY_SEC: Final = 60.0
#: zlib's own default: most of level 9's ratio on span JSON for a fraction of its CPU.
GZIP_LEVEL: Final = 6
COMPRESSIONS: Final = ("none", "gzip", "deflate")

# SpanFlags: bit 8 says whether bit 9 (the parent is remote) is known; the SDK sets both.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200

_encode = msgspec.json.Encoder().encode


def _value(v: object) -> dict[str, Any]:
    # Exact type checks first: every attribute we record is one of these, and bool must be
    # tested before int (it is one).
    t = type(v)
    if t is str:
        return {"stringValue": v}
    if t is int:
        return {"intValue": str(v)}
    if t is bool:
        return {"boolValue": v}
    if t is float:
        if math.isfinite(v):  # type: ignore[arg-type]
            return {"doubleValue": v}
        # JSON has no NaN or infinity; protobuf's JSON mapping spells them as strings.
        return {"doubleValue": "NaN" if math.isnan(v)  # type: ignore[arg-type]
                else "Infinity" if v > 0 else "-Infinity"}  # type: ignore[operator]
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    if isinstance(v, bytes):
        return {"bytesValue": base64.b64encode(v).decode()}
    if isinstance(v, int):  # an int subclass (an IntEnum)
        return {"intValue": str(int(v))}
    return {"stringValue": str(v)}


def _attributes(attributes: Mapping[str, object] | None) -> list[dict[str, Any]]:
    if not attributes:
        return []
    return [{"key": k, "value": _value(v)} for k, v in attributes.items()]


# Spans are written as JSON bytes directly, not as dicts for msgspec: a batch of 512
# requests would otherwise allocate ~40 000 dicts and lists, and the garbage collector's
# passes over them (and over everything else alive) cost as much as building them.
# Strings and bytes are not tracked by the collector.

#: `{"key":"<key>","value":` per attribute key: our keys are a few dozen.
_KEYS: dict[str, bytes] = {}
_KEYS_MAX: Final = 4096
_TRUE: Final = b'{"boolValue":true}}'
_FALSE: Final = b'{"boolValue":false}}'


def _key(key: str) -> bytes:
    head = _KEYS.get(key)
    if head is None:
        head = b'{"key":' + _encode(key) + b',"value":'
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[key] = head
    return head


def _tail(v: object) -> bytes:
    """An attribute's value, and the brace that closes its key-value pair."""
    t = type(v)
    if t is str:
        return b'{"stringValue":' + _encode(v) + b"}}"
    if t is int:
        return b'{"intValue":"%d"}}' % v  # type: ignore[str-format]
    if t is bool:
        return _TRUE if v else _FALSE
    if t is float and math.isfinite(v):  # type: ignore[arg-type]
        return b'{"doubleValue":' + _encode(v) + b"}}"
    return _encode(_value(v)) + b"}"


def _attributes_json(attributes: Mapping[str, object] | None) -> bytes:
    if not attributes:
        return b"[]"
    return b"[" + b",".join([_key(k) + _tail(v) for k, v in attributes.items()]) + b"]"


def encode_span(span: ReadableSpan) -> bytes:
    """One span in OTLP JSON."""
    ctx = span.context
    parent = span.parent
    extra = b""
    if parent is not None:
        extra = b'"parentSpanId":"%016x",' % parent.span_id
    if ctx.trace_state:
        extra += b'"traceState":' + _encode(ctx.trace_state.to_header()) + b","
    if span._events:
        extra += b'"events":[' + b",".join([
            b'{"timeUnixNano":"%d","name":%s,"attributes":%s}' % (
                e.timestamp, _encode(e.name), _attributes_json(e.attributes))
            for e in span._events]) + b"],"
    status = span._status
    # `_value_`, not `value`: the enum property costs more than the rest of the line.
    if code := status.status_code._value_:
        extra += (b'"status":{"code":%d,"message":%s},' % (code, _encode(status.description))
                  if status.description else b'"status":{"code":%d},' % code)
    return (b'{"traceId":"%032x","spanId":"%016x",%s"name":%s,"kind":%d,'
            b'"startTimeUnixNano":"%d","endTimeUnixNano":"%d","attributes":%s,"flags":%d}' % (
                ctx.trace_id, ctx.span_id, extra, _encode(span._name),
                # OTLP's SpanKind numbers: UNSPECIFIED is 0, so each is the API's plus one.
                span._kind._value_ + 1, span._start_time or 0, span._end_time or 0,
                _attributes_json(span._attributes),  # no read-only view per span
                _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote
                else _HAS_IS_REMOTE))


def _resource(resource: Resource) -> dict[str, Any]:
    out: dict[str, Any] = {"resource": {"attributes": _attributes(resource.attributes)}}
    if resource.schema_url:
        out["schemaUrl"] = resource.schema_url
    return out


def _scope(scope: InstrumentationScope | None) -> dict[str, Any]:
    if scope is None:
        return {}
    out: dict[str, Any] = {"name": scope.name}
    if scope.version:
        out["version"] = scope.version
    return out


class JsonSpanExporter(SpanExporter):
    """POSTs batches to an OTLP/HTTP traces endpoint (`…/v1/traces`) as JSON."""

    def __init__(self, endpoint: str, *, headers: Mapping[str, str] | None = None,
                 timeout: float = 10.0, compression: str = "none",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._ssl = ssl_context
        self._timeout = timeout
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS}")
        self._compression = compression
        self._headers = {"Content-Type": "application/json", "User-Agent": "bulwark-otlp",
                         **(headers or {})}
        if compression != "none":
            self._headers["Content-Encoding"] = compression
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False
        self._stopping = threading.Event()
        self._warned_at = -math.inf
        #: Resources and scopes are few and immutable: encoded once, by identity (each is
        #: held here too, so that its id cannot be reused by another object).
        self._cache: dict[int, tuple[object, bytes]] = {}

    # encoding

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Grouped by identity: `Resource.__hash__` serialises the resource to JSON on every
        # call. Every span of a process shares one resource and one scope object.
        scopes_t = dict[int, tuple[InstrumentationScope | None, list[bytes]]]
        groups: dict[int, tuple[Resource, scopes_t]] = {}
        for span in spans:
            resource = span._resource
            entry = groups.get(id(resource))
            if entry is None:
                entry = groups[id(resource)] = (resource, {})
            scope = span._instrumentation_scope
            by_scope = entry[1].get(id(scope))
            if by_scope is None:
                by_scope = entry[1][id(scope)] = (scope, [])
            by_scope[1].append(encode_span(span))
        body = b'{"resourceSpans":[' + b",".join([
            self._once(resource, _resource)[:-1] + b',"scopeSpans":[' + b",".join([
                b'{"scope":%s,"spans":[%s]}' % (self._once(scope, _scope), b",".join(encoded))
                for scope, encoded in scopes.values()]) + b"]}"
            for resource, scopes in groups.values()]) + b"]}"
        if self._compression == "gzip":
            return gzip.compress(body, compresslevel=GZIP_LEVEL)
        if self._compression == "deflate":
            return zlib.compress(body, GZIP_LEVEL)
        return body

    def _once(self, obj: Any, encode: Callable[[Any], dict[str, Any]]) -> bytes:
        cached = self._cache.get(id(obj))
        if cached is None:
            cached = self._cache[id(obj)] = (obj, _encode(encode(obj)))
        return cached[1]

    # the SpanExporter interface

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopping.is_set():
            return SpanExportResult.FAILURE
        try:
            body = self.encode(spans)
        except Exception:  # a bug here must cost spans, never the processor's thread
            log.exception("could not encode %d spans", len(spans))
            return SpanExportResult.FAILURE
        deadline = time.monotonic() + self._timeout
        why = ""
        for attempt in range(MAX_TRIES):
            reused = self._conn is not None
            try:
                status, retry_after = self._post(body, deadline)
            except TimeoutError:
                self._close()
                why = f"no answer within {self._timeout:g} s"
                break
            except (OSError, http.client.HTTPException) as err:
                self._close()
                why = f"{type(err).__name__}: {err}"
                if reused:
                    continue  # the collector closed a kept-alive connection: try a new one now
                delay = None
            else:
                if 200 <= status < 300:
                    return SpanExportResult.SUCCESS
                why = f"HTTP {status}"
                if status in (400, 415):
                    why += (" (a receiver that takes no JSON? "
                            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)")
                if status not in RETRY_STATUSES:
                    break
                delay = retry_after
            if attempt == MAX_TRIES - 1:
                break
            if delay is None:
                delay = random.uniform(0, BACKOFF_SEC * 2 ** attempt)  # full jitter
            if time.monotonic() + delay >= deadline or self._stopping.wait(delay):
                break
        self._warn(f"dropped {len(spans)} spans: {why}")
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._stopping.set()
        self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is held here between exports

    # HTTP

    def _post(self, body: bytes, deadline: float) -> tuple[int, float | None]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        conn = self._conn
        if conn is None:
            conn = self._conn = (
                http.client.HTTPSConnection(self._host, self._port, timeout=remaining,
                                            context=self._ssl)
                if self._https else
                http.client.HTTPConnection(self._host, self._port, timeout=remaining))
        elif conn.sock is not None:
            conn.sock.settimeout(remaining)
        conn.request("POST", self._path, body, self._headers)
        resp = conn.getresponse()
        resp.read()  # the whole answer, or the connection cannot be reused
        if resp.will_close:
            self._close()
        return resp.status, _retry_after(resp.getheader("Retry-After"))

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SEC:
            self._warned_at = now
            log.warning("OTLP export failed: %s", message)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: our own backoff is as good
    return seconds if 0 <= seconds < math.inf else None
