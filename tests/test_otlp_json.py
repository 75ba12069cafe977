"""The OTLP/HTTP JSON exporter (bulwark/otlp.py): what it writes decodes to exactly the
protobuf the SDK's own encoder makes of the same spans, and what it does with a collector
that answers 503, wants gzip, or is not there."""

from __future__ import annotations

import base64
import gzip
import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from google.protobuf import json_format  # type: ignore[import-untyped]  # no stubs here
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bulwark.otlp import JsonSpanExporter
from bulwark.telemetry import Tracing
from tests.procs import free_port


def _spans() -> list[ReadableSpan]:
    """Spans as bulwark records them, with every kind of value an attribute can hold."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON), shutdown_on_exit=False,
                              resource=Resource.create({"service.name": "t", "n": 3}))
    propagator = TraceContextTextMapPropagator()
    tracing = Tracing(provider, SimpleSpanProcessor(memory), propagator, capture=False)
    parent = propagator.extract(
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
         "tracestate": "vendor=x"})
    server = tracing._start("POST /v1/chat/completions", SpanKind.SERVER,
                            {"s": 'quote " back \\ snowman ☃ nl \n', "i": -(2 ** 63),
                             "big": 2 ** 62, "b": True, "f": 0.1, "inf": math.inf,
                             "tiny": 1e-300, "strs": ["stop", "length"], "ints": [1, 2],
                             "bools": [False]}, parent)
    server.add_event("bulwark.retry", {"bulwark.provider": "alpha", "bulwark.delay_s": 0.0})
    root = tracing._root("health_check alpha", SpanKind.CLIENT, {"bulwark.probe.ok": False})
    root.set_status(StatusCode.ERROR, "server_error")
    root.end()
    server.set_status(StatusCode.ERROR)
    server.end()
    return list(memory.get_finished_spans())


def _from_json(body: bytes) -> ExportTraceServiceRequest:
    """OTLP JSON to protobuf: ids are hex in OTLP's JSON, base64 in protobuf's own."""
    data = json.loads(body)
    for rs in data["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    msg = ExportTraceServiceRequest()
    json_format.ParseDict(data, msg)
    return msg


def test_json_decodes_to_what_the_sdk_encoder_makes() -> None:
    """Ids, kinds, times, flags, trace state, every attribute type, events and status are
    the same after a round trip through OTLP JSON as the SDK's protobuf encoder's."""
    spans = _spans()
    assert len(spans) == 2
    ours = _from_json(JsonSpanExporter("http://127.0.0.1:9/v1/traces").encode(spans))
    assert ours == encode_spans(spans)


class _Collector:
    """A scripted OTLP/HTTP receiver: answers each POST with the next status."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append((dict(self.headers), body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                if status != 200:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector503() -> Iterator[_Collector]:
    c = _Collector([503, 429])
    yield c
    c.close()


def test_retries_a_503_then_sends_gzip_with_the_configured_headers(
        collector503: _Collector) -> None:
    """503 and 429 are tried again (Retry-After honoured) on the same kept-alive
    connection; the body is gzip'd JSON with the OTEL_EXPORTER_OTLP_HEADERS given."""
    spans = _spans()
    exporter = JsonSpanExporter(collector503.url, headers={"x-tenant": "acme"},
                                compression="gzip", timeout=5)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert len(collector503.bodies) == 4
    headers, body = collector503.bodies[-1]
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["x-tenant"] == "acme"
    assert _from_json(gzip.decompress(body)) == encode_spans(spans)


def test_a_collector_that_is_not_there_costs_spans_not_an_exception(
        caplog: pytest.LogCaptureFixture) -> None:
    """Connection refused until the deadline: FAILURE and one warning, nothing raised."""
    exporter = JsonSpanExporter(f"http://127.0.0.1:{free_port()}/v1/traces", timeout=0.3)
    assert exporter.export(_spans()) is SpanExportResult.FAILURE
    assert exporter.export(_spans()) is SpanExportResult.FAILURE
    warnings = [r for r in caplog.records if "OTLP export failed" in r.getMessage()]
    assert len(warnings) == 1  # at most one a minute
