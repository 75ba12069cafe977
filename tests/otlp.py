"""A real OpenTelemetry collector for tests: rotel (PyPI's Rust agent) receiving OTLP/HTTP,
forwarding what it receives over OTLP/HTTP to a small receiver here that decodes
`ExportTraceServiceRequest` with opentelemetry-proto, so tests read what the collector got."""

from __future__ import annotations

import gzip
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import rotel
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.procs import free_port

AGENT = Path(rotel.__file__).parent / "rotel-agent"



def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class SpanRecord:
    name: str
    kind: int  # 2 SERVER, 3 CLIENT
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: int  # 2 ERROR
    service: str
    resource: dict[str, Any] = field(default_factory=dict)


class Received:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[SpanRecord] = []
        self.requests = 0

    def add(self, msg: ExportTraceServiceRequest) -> None:
        out = []
        for rs in msg.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(SpanRecord(
                        name=s.name, kind=s.kind, trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        events=[(e.name, {a.key: _value(a.value) for a in e.attributes})
                                for e in s.events],
                        status=s.status.code, service=str(resource.get("service.name")),
                        resource=resource))
        with self._lock:
            self.spans.extend(out)
            self.requests += 1

    def of(self, service: str) -> list[SpanRecord]:
        with self._lock:
            return [s for s in self.spans if s.service == service]


class Collector:
    """rotel listening on `endpoint` (OTLP/HTTP), forwarding to our receiver."""

    def __init__(self, tmp: Path) -> None:
        self.received = Received()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                received.add(msg)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        sink = self._server.server_address[1]
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "rotel.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(AGENT), "start",
                 "--otlp-http-endpoint", f"127.0.0.1:{self.port}",
                 "--otlp-grpc-endpoint", f"127.0.0.1:{free_port()}",
                 "--exporter", "otlp", "--otlp-exporter-protocol", "http",
                 "--otlp-exporter-endpoint", f"http://127.0.0.1:{sink}",
                 "--batch-timeout", "100ms",
                 "--pid-file", str(tmp / "rotel.pid"), "--log-file", str(tmp / "rotel.out")],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rotel did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._server.shutdown()
        self._server.server_close()
