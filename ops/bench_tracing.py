"""What one traced request costs the process, in process: spans, processor, encoding, export.

    .venv/bin/python -m ops.bench_tracing                  # ~30 s
    .venv/bin/python -m ops.bench_tracing --requests 500   # smoke check

A real collector (rotel, black-hole exporter, its own process: its CPU is not counted)
receives every span over OTLP/HTTP. Two ways of tracing the same fake chat requests, in
the same run, interleaved over rounds:

- `sdk`: the OpenTelemetry SDK driven the standard way, as bulwark did until 2026-11-29 —
  `Tracer.start_span` (sampler, span limits, a lock per attribute call), `context.attach`/
  `detach`, `BatchSpanProcessor`, and the OTLP/HTTP protobuf exporter (`requests`);
- `bulwark`: `bulwark.telemetry` as it is now (`setup`, `Tracing.serve`, `.attempt`, …).

Each request is the edge's `Tracing.serve` around a handler that starts one upstream
attempt and ends it (`json`: `succeeded` with a completion; `stream`: `first_token` then
`stream_done`). CPU is `time.process_time()` (every thread: the event loop's and the
exporter's) from the first request until the collector has acknowledged the last span,
minus the same loop with tracing off; `spans` is the loop thread's share
(`time.thread_time()`), `export` the rest (the processor's thread and the final flush).
Read the ratios: absolute times move with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind

from bulwark import telemetry
from bulwark.config import ProviderConfig, Settings, resolve
from bulwark.metrics import AttemptMetrics
from bulwark.wire import (
    ChatCompletion,
    ChatRequest,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    Message,
    ResponseMessage,
    Usage,
)
from ops.bench_chat import free_port

Serve = Callable[[web.Request, Callable[[web.Request], Awaitable[web.StreamResponse]], str],
                 Awaitable[web.StreamResponse]]

PROVIDER = resolve(ProviderConfig(name="alpha", kind="openai",
                                  base_url="http://127.0.0.1:9/v1", priority=1,
                                  models={"default": "sim-1"}), Settings())
CHAT = ChatRequest(model="default", messages=[Message(role="user", content="Hello there")],
                   max_tokens=50, temperature=0.3)
STREAM_CHAT = ChatRequest(model="default", messages=[Message(role="user", content="Hi")],
                          stream=True)
COMPLETION = ChatCompletion(id="chatcmpl-1", created=1, model="sim-1", choices=[
    Choice(message=ResponseMessage(content="Hello!"), finish_reason="stop")],
    usage=Usage(prompt_tokens=12, completion_tokens=30, total_tokens=42))
TAIL = [Chunk(id="chatcmpl-2", created=1, model="sim-1",
              choices=[ChunkChoice(delta=Delta(content="."), finish_reason="stop")]),
        Chunk(id="chatcmpl-2", created=1, model="sim-1",
              usage=Usage(prompt_tokens=12, completion_tokens=30, total_tokens=42))]


class SdkWay:
    """The SDK's standard path, call for call what bulwark/telemetry.py did before
    2026-11-29 for a request that starts a sampled trace."""

    def __init__(self, endpoint: str, queue: int) -> None:
        self.provider = TracerProvider(sampler=ParentBased(ALWAYS_ON),
                                       resource=Resource.create({"service.name": "bench-sdk"}),
                                       shutdown_on_exit=False)
        self.processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint + "/v1/traces",
                                                             timeout=10.0),
                                            max_queue_size=queue)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("bulwark")

    async def serve(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    request_id: str) -> web.StreamResponse:
        span = self.tracer.start_span(f"{request.method} {request.path}", kind=SpanKind.SERVER)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        span.update_name(f"{request.method} {route}")
        span.set_attributes({"http.request.method": request.method, "url.path": request.path,
                             "http.route": route, "bulwark.request_id": request_id})
        token = otel_context.attach(trace.set_span_in_context(span, None))
        try:
            resp = await handler(request)
            span.set_attribute("http.response.status_code", resp.status)
            return resp
        finally:
            otel_context.detach(token)
            span.end()

    def attempt(self, chat: ChatRequest, stream: bool) -> None:
        span = self.tracer.start_span("chat sim-1", kind=SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "sim-1", "gen_ai.request.stream": chat.stream,
            "bulwark.provider": "alpha", "bulwark.model": "default", "bulwark.attempt": 1,
            "server.address": "127.0.0.1", "server.port": 9,
            **({} if stream else {"gen_ai.request.max_tokens": 50,
                                  "gen_ai.request.temperature": 0.3})})
        ctx = span.get_span_context()
        _ = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        if stream:
            span.add_event("gen_ai.first_chunk", {"bulwark.ttft_s": 0.01})
        span.set_attributes({"gen_ai.response.id": "chatcmpl-1", "gen_ai.response.model": "sim-1",
                             "gen_ai.response.finish_reasons": ["stop"],
                             "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 30})
        span.end()

    def flush(self) -> None:
        self.provider.force_flush()

    def shutdown(self) -> None:
        self.provider.shutdown()


class BulwarkWay:
    def __init__(self, endpoint: str, queue: int) -> None:
        tracing = telemetry.setup({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                   "OTEL_BSP_MAX_QUEUE_SIZE": str(queue)},
                                  service_name="bench-bulwark")
        assert tracing is not None
        self.tracing = tracing
        self.serve: Serve = tracing.serve
        self.metrics = AttemptMetrics("alpha", "default")

    def attempt(self, chat: ChatRequest, stream: bool) -> None:
        att = self.tracing.attempt(self.metrics, PROVIDER, chat, "sim-1", 1)
        assert att.traceparent
        if stream:
            att.first_token(0.01)
            att.stream_done(0.02, TAIL)
        else:
            att.succeeded(0.02, COMPLETION)

    def flush(self) -> None:
        self.tracing.provider.force_flush()

    def shutdown(self) -> None:
        self.tracing.shutdown()


Way = SdkWay | BulwarkWay


def _requests() -> list[web.Request]:
    app = web.Application()

    async def nothing(request: web.Request) -> web.Response:
        return web.Response()
    route = app.router.add_post("/v1/chat/completions", nothing)
    out = []
    for _ in range(16):
        req = make_mocked_request("POST", "/v1/chat/completions", app=app)
        # The helper matches every request to a placeholder route; the edge reads the real
        # one's canonical path for the span name.
        match = UrlMappingMatchInfo({}, route)
        match.add_app(app)
        req._match_info = match
        out.append(req)
    return out


async def _loop(way: Way | None, n: int, stream: bool, requests: list[web.Request]) -> None:
    chat = STREAM_CHAT if stream else CHAT

    async def handler(request: web.Request) -> web.StreamResponse:
        if way is not None:
            way.attempt(chat, stream)
        return web.Response(text="ok")

    for i in range(n):
        req = requests[i % len(requests)]
        if way is None:
            await handler(req)
        else:
            await way.serve(req, handler, f"req_{i}")


def _flush_elsewhere(way: Way) -> None:
    """The final flush on a thread of its own, so that the loop thread's clock holds span
    work only."""
    worker = threading.Thread(target=way.flush)
    worker.start()
    worker.join()


def measure(way: Way | None, n: int, stream: bool, requests: list[web.Request]
            ) -> tuple[float, float]:
    """(process CPU, loop-thread CPU) in seconds for n requests, export included."""
    gc.collect()
    p0, t0 = time.process_time(), time.thread_time()
    asyncio.run(_loop(way, n, stream, requests))
    t1 = time.thread_time()
    if way is not None:
        _flush_elsewhere(way)
    return time.process_time() - p0, t1 - t0


def collector(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    import rotel

    agent = Path(rotel.__file__).parent / "rotel-agent"
    port = free_port()
    proc = subprocess.Popen(
        [str(agent), "start", "--otlp-http-endpoint", f"127.0.0.1:{port}",
         "--otlp-grpc-endpoint", f"127.0.0.1:{free_port()}", "--exporter", "blackhole",
         "--pid-file", str(tmp / "rotel.pid"), "--log-file", str(tmp / "rotel.out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    import socket
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rotel did not start") from None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="traced requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="json,stream")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = collector(Path(tmp))
        try:
            # Room for every span of a round: a span dropped at a full queue would be a span
            # whose export is not counted.
            queue = 2 * args.requests + 1000
            ways: dict[str, Way] = {"sdk": SdkWay(endpoint, queue),
                                    "bulwark": BulwarkWay(endpoint, queue)}
            requests = _requests()
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for mode in modes:
                stream = mode == "stream"
                for way in ways.values():  # warm-up: connections, caches, first imports
                    measure(way, 300, stream, requests)
                for r in range(args.rounds):
                    order = list(ways.items())
                    if r % 2:
                        order.reverse()
                    bare, _ = measure(None, args.requests, stream, requests)
                    bare_us = bare / args.requests * 1e6
                    for name, way in order:
                        total, loop = measure(way, args.requests, stream, requests)
                        total_us = total / args.requests * 1e6 - bare_us
                        spans_us = loop / args.requests * 1e6 - bare_us
                        results.setdefault((mode, name), []).append((total_us, spans_us))
            for way in ways.values():
                way.shutdown()
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"{args.requests} traced requests x {args.rounds} rounds, µs per traced request "
          "(median; bare handler loop subtracted)")
    print(f"{'mode':8} {'way':8} {'all-in':>8} {'spans':>8} {'export':>8} {'vs sdk':>7}")
    for mode in modes:
        sdk_total = statistics.median(t for t, _ in results[(mode, "sdk")])
        for name in ways:
            rows = results[(mode, name)]
            total = statistics.median(t for t, _ in rows)
            spans = statistics.median(s for _, s in rows)
            print(f"{mode:8} {name:8} {total:8.1f} {spans:8.1f} {total - spans:8.1f} "
                  f"{total / sdk_total:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
