"""OpenTelemetry traces, by hand: a SERVER span per request, a CLIENT span per upstream attempt.

On only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set; otherwise
`setup()` returns None and nothing here runs — no span, no context, no id. With it, each
span is recorded as the SDK's `ReadableSpan` by our own small `Span` (not through
`Tracer.start_span`), the request's span lives in one contextvar, and finished spans go
through the SDK's `BatchSpanProcessor` (a bounded queue; spans beyond it are dropped) to
the OTLP/HTTP JSON exporter (`bulwark/otlp.py`) on the processor's own thread, so a
collector that is down or slow never delays or fails a request: the exporter's retries and
timeouts happen off the event loop. The SDK's sampler, resource and processor are used as
they are; `ops/bench_tracing.py` measures what this costs against the SDK's standard path.

Standard variables (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/):
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (+ `_ARG`, e.g.
`parentbased_traceidratio` and `0.1`), `OTEL_PROPAGATORS` (tracecontext, baggage),
`OTEL_EXPORTER_OTLP_[TRACES_]{ENDPOINT,HEADERS,TIMEOUT,COMPRESSION,PROTOCOL,CERTIFICATE,
CLIENT_CERTIFICATE,CLIENT_KEY}`, `OTEL_BSP_*`,
`OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER=none`. A value we cannot use falls back to the
SDK's default with a warning; it never stops the process.

Attempt spans follow the GenAI semantic conventions: named `chat {gen_ai.request.model}`,
kind CLIENT, with `gen_ai.operation.name`, `gen_ai.provider.name` (the vendor: openai,
anthropic, gcp.gemini), `gen_ai.request.*`, `gen_ai.response.*`, `gen_ai.usage.*` and
`error.type`; `bulwark.provider` names the configured provider. Retries, failovers, breaker
decisions and stream continuations are events on the request's SERVER span. Prompt and
answer text are recorded only with `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from aiohttp import web
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from bulwark import logs
from bulwark.config import Provider
from bulwark.errors import UpstreamError
from bulwark.metrics import AttemptMetrics
from bulwark.otlp import COMPRESSIONS, JsonSpanExporter
from bulwark.providers.base import StreamEvent
from bulwark.wire import ChatCompletion, ChatRequest, Chunk

log = logging.getLogger("bulwark.telemetry")

CAPTURE_ENV: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Requests with a span of their own: the API. Health checks and scrapes arrive every second
#: or so and would drown the traces that matter.
TRACED_PREFIXES: Final = ("/v1/", "/admin/")
#: gen_ai.provider.name well-known values, by provider kind.
_VENDOR: Final = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
                  "sim": "bulwark.sim"}
#: On shutdown, pending spans get this long to leave; a collector that is down must not
#: hold the process past honcho's 5 s kill.
SHUTDOWN_SEC: Final = 1.0
#: OTEL_SPAN_EVENT_COUNT_LIMIT's default: a breaker flapping under a long request cannot
#: grow its span without bound.
EVENT_LIMIT: Final = 128
_SAMPLERS: Final = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
                    "parentbased_always_off", "parentbased_traceidratio")


# -- configuration ---------------------------------------------------------------------------


def _sampler(env: Mapping[str, str]) -> tuple[Sampler, float | None]:
    """The SDK sampler, and the share of new (root) traces to record when we decide that
    ourselves. For the parent-based samplers (the default) we do: a request that starts a
    trace and is not sampled then costs nothing at all — no span, no ids, no context — which
    is most requests at 10 %. The SDK then sees only roots we chose, and callers' contexts."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name not in _SAMPLERS:
        log.warning("OTEL_TRACES_SAMPLER %r is not supported; using parentbased_always_on",
                    name)
        name = "parentbased_always_on"
    rate = 1.0
    if name.endswith("traceidratio"):
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            rate = float(raw)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            log.warning("OTEL_TRACES_SAMPLER_ARG %r is not a ratio in [0, 1]; using 1.0", raw)
            rate = 1.0
    elif name.endswith("always_off"):
        rate = 0.0
    if name.startswith("parentbased_"):
        return ParentBased(ALWAYS_ON), rate
    if name == "traceidratio":
        return TraceIdRatioBased(rate), None
    return (ALWAYS_OFF if rate == 0.0 else ALWAYS_ON), None


def _pairs(raw: str, what: str) -> dict[str, str]:
    """`k=v,k2=v2` (values URL-encoded), as OTEL_RESOURCE_ATTRIBUTES and _HEADERS are."""
    out: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            log.warning("%s: ignoring %r (not key=value)", what, item.strip()[:40])
            continue
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def _number(env: Mapping[str, str], name: str, default: float, *, low: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = low - 1.0
    if not value >= low:  # also NaN
        log.warning("%s %r is not a number >= %s; using %s", name, raw, low, default)
        return default
    return value


def _endpoint(env: Mapping[str, str]) -> str | None:
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return None
    return base.rstrip("/") + "/v1/traces"


def _compression(env: Mapping[str, str]) -> str:
    raw = (env.get("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")
           or env.get("OTEL_EXPORTER_OTLP_COMPRESSION") or "none").strip().lower()
    if raw not in COMPRESSIONS:
        log.warning("OTLP compression %r is not supported; sending uncompressed", raw)
        return "none"
    return raw


def _signal(env: Mapping[str, str], name: str) -> str:
    """`OTEL_EXPORTER_OTLP_TRACES_<name>`, else `OTEL_EXPORTER_OTLP_<name>`, else ""."""
    return (env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
            or env.get(f"OTEL_EXPORTER_OTLP_{name}") or "").strip()


def _protocol(env: Mapping[str, str]) -> str:
    raw = _signal(env, "PROTOCOL").lower() or "http/json"
    if raw not in ("http/json", "http/protobuf"):
        log.warning("OTEL_EXPORTER_OTLP_PROTOCOL %r is not supported; using http/json", raw)
        return "http/json"
    return raw


def _ssl_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    """For an https endpoint: the CA file and client certificate the OTEL_* variables name
    (the system's CAs when none); None when unusable, with a warning."""
    try:
        context = ssl.create_default_context(cafile=_signal(env, "CERTIFICATE") or None)
        if cert := _signal(env, "CLIENT_CERTIFICATE"):
            context.load_cert_chain(cert, _signal(env, "CLIENT_KEY") or None)
    except (OSError, ssl.SSLError) as err:
        log.warning("OTLP TLS files unusable (%s); using the system's CAs", err)
        return None
    return context


def _exporter(env: Mapping[str, str], endpoint: str, headers: dict[str, str],
              timeout: float) -> SpanExporter:
    compression = _compression(env)
    if _protocol(env) == "http/protobuf":
        # The SDK's exporter, for a collector that takes no JSON: several times the CPU.
        return OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout,
                                compression=Compression(compression))
    context = _ssl_context(env) if endpoint.startswith("https:") else None
    return JsonSpanExporter(endpoint, headers=headers, timeout=timeout,
                            compression=compression, ssl_context=context)


def _propagator(env: Mapping[str, str]) -> TextMapPropagator:
    names = [n.strip().lower() for n in env.get("OTEL_PROPAGATORS", "tracecontext,baggage")
             .split(",") if n.strip()]
    chosen: list[TextMapPropagator] = []
    for name in names:
        if name == "tracecontext":
            chosen.append(TraceContextTextMapPropagator())
        elif name == "baggage":
            chosen.append(W3CBaggagePropagator())
        elif name != "none":
            log.warning("OTEL_PROPAGATORS: %r is not supported; ignored", name)
    if not chosen and "none" not in names:
        chosen.append(TraceContextTextMapPropagator())
    return CompositePropagator(chosen)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def setup(env: Mapping[str, str], *, service_name: str) -> Tracing | None:
    """Tracing as the environment asks for it, or None (no endpoint, SDK disabled)."""
    endpoint = _endpoint(env)
    if endpoint is None or _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    attributes: dict[str, Any] = {"service.name": service_name}
    attributes.update(_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES"))
    if env.get("OTEL_SERVICE_NAME", "").strip():
        attributes["service.name"] = env["OTEL_SERVICE_NAME"].strip()
    headers = _pairs(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""), "OTEL_EXPORTER_OTLP_HEADERS")
    headers.update(_pairs(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS", ""),
                          "OTEL_EXPORTER_OTLP_TRACES_HEADERS"))
    timeout = _number(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                      _number(env, "OTEL_EXPORTER_OTLP_TIMEOUT", 10_000.0, low=1.0), low=1.0)
    queue_size = int(_number(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048, low=1))
    export_timeout = _number(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000, low=1)
    try:
        # The spec says milliseconds; exporters take seconds. The SDK's batch processor
        # keeps OTEL_BSP_EXPORT_TIMEOUT but does not enforce it: the exporter's deadline does.
        exporter = _exporter(env, endpoint, headers, min(timeout, export_timeout) / 1000.0)
    except ValueError as err:
        log.warning("OTLP endpoint %r unusable (%s); tracing off", endpoint, err)
        return None
    processor = BatchSpanProcessor(
        exporter, max_queue_size=queue_size,
        schedule_delay_millis=_number(env, "OTEL_BSP_SCHEDULE_DELAY", 5000, low=1),
        max_export_batch_size=int(min(_number(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, low=1),
                                      queue_size)),
        export_timeout_millis=export_timeout)
    sampler, root_rate = _sampler(env)
    provider = TracerProvider(sampler=sampler, resource=Resource.create(attributes),
                              shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracing = Tracing(provider, processor, _propagator(env),
                      capture=_truthy(env.get(CAPTURE_ENV)), root_rate=root_rate)
    logs.trace_ids = current_ids
    log.info("tracing on", extra={"endpoint": urlsplit(endpoint).netloc,
                                  "service": attributes["service.name"]})
    return tracing


def _messages(chat: ChatRequest) -> str:
    return json.dumps([{"role": m.role, "parts": [{"type": "text", "content": m.text()}]}
                       for m in chat.messages], ensure_ascii=False)


def _output(text: str, finish: str | None) -> str:
    message: dict[str, Any] = {"role": "assistant",
                               "parts": [{"type": "text", "content": text}]}
    if finish:
        message["finish_reason"] = finish
    return json.dumps([message], ensure_ascii=False)


# -- spans -----------------------------------------------------------------------------------


class Span(ReadableSpan):
    """A span recorded by hand: the SDK's own data model (a `ReadableSpan`, what processors
    and exporters take), filled in place and handed to the span processor when it ends.

    Why not `Tracer.start_span`: per span it runs the sampler, builds span limits and
    `BoundedAttributes` (a lock per attribute call), and the request's context needs an
    `attach`/`detach` — about a third of a traced request's cost in `ops/bench_tracing.py`,
    for checks our own code does not need: the attributes are ours, few and typed. Used on
    the event loop's thread only; after `end` it belongs to the processor and changes are
    ignored (as the SDK ignores them on an ended span)."""

    def __init__(self, tracing: Tracing, name: str, kind: SpanKind, *, context: SpanContext,
                 parent: SpanContext | None, attributes: dict[str, AttributeValue],
                 recording: bool = True) -> None:
        self.span_context = context  # the same as `context`, typed without its None
        self._attrs = attributes
        self._event_list: list[Event] = []
        super().__init__(name, context, parent, tracing.resource, attributes,
                         self._event_list, kind=kind, start_time=time.time_ns(),
                         instrumentation_scope=tracing.scope)
        self._on_end = tracing.on_end
        self.recording = recording
        self.ended = False
        self._ids: tuple[str, str] | None = None

    def is_recording(self) -> bool:
        return self.recording and not self.ended

    def ids(self) -> tuple[str, str]:
        """Trace and span id in hex, for log lines (formatted once)."""
        if self._ids is None:
            ctx = self.span_context
            self._ids = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        return self._ids

    def traceparent(self) -> str:
        trace_id, span_id = self.ids()
        return f"00-{trace_id}-{span_id}-{int(self.span_context.trace_flags):02x}"

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if not self.ended:
            self._attrs[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self.ended:
            self._attrs.update(attributes)

    def add_event(self, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        if not self.ended and len(self._event_list) < EVENT_LIMIT:
            self._event_list.append(Event(name, attributes, time.time_ns()))

    def set_status(self, code: StatusCode, description: str | None = None) -> None:
        if not self.ended:
            self._status = Status(code, description if code is StatusCode.ERROR else None)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._end_time = time.time_ns()
        if self.recording:
            self._on_end(self)


#: The request being served, for its events, its attempts' parent and its log lines: one
#: contextvar instead of OpenTelemetry's context (a dict copied per `attach`). None outside
#: a trace, and for every request the sampler dropped.
_current: ContextVar[Span | None] = ContextVar("bulwark_span", default=None)


def current_ids() -> tuple[str, str] | None:
    """The current trace and span ids (hex), for log lines; None outside a trace."""
    span = _current.get()
    return None if span is None else span.ids()


def _new_id(bits: int) -> int:
    # random's Mersenne Twister, as the SDK's RandomIdGenerator; 0 is not a valid id.
    while True:
        value = random.getrandbits(bits)
        if value:
            return value


_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)


# -- the tracer ------------------------------------------------------------------------------


class Tracing:
    def __init__(self, provider: TracerProvider, processor: SpanProcessor,
                 propagator: TextMapPropagator, *, capture: bool,
                 root_rate: float | None = None) -> None:
        #: Holds the sampler, the resource and the processor; `provider.shutdown` flushes.
        self.provider = provider
        self.sampler = provider.sampler
        self.resource = provider.resource
        self.scope = InstrumentationScope("bulwark")
        self.on_end = processor.on_end
        #: Share of new traces recorded, decided here (None: the SDK's sampler decides).
        self.root_rate = root_rate
        self.propagator = propagator
        self.capture = capture
        self._servers: dict[str, dict[str, AttributeValue]] = {}

    def _start(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue],
               parent: Context | None = None) -> Span:
        """A span as the SDK's sampler decides, under a caller's valid context or new."""
        remote = trace.get_current_span(parent).get_span_context() if parent else None
        trace_id = remote.trace_id if remote is not None else _new_id(128)
        result = self.sampler.should_sample(parent, trace_id, name, kind, attributes)
        sampled = result.decision is Decision.RECORD_AND_SAMPLE
        if result.attributes:
            attributes.update(result.attributes)
        ctx = SpanContext(trace_id, _new_id(64), is_remote=False,
                          trace_flags=_SAMPLED if sampled else _UNSAMPLED,
                          trace_state=result.trace_state)
        return Span(self, name, kind, context=ctx, parent=remote, attributes=attributes,
                    recording=sampled)

    def _root(self, name: str, kind: SpanKind, attributes: dict[str, AttributeValue]) -> Span:
        """A new trace already chosen by `sample_root`."""
        ctx = SpanContext(_new_id(128), _new_id(64), is_remote=False, trace_flags=_SAMPLED)
        return Span(self, name, kind, context=ctx, parent=None, attributes=attributes)

    def _server(self, base_url: str) -> dict[str, AttributeValue]:
        """`server.address`/`.port` of a provider, parsed once: urlsplit costs ~5 µs."""
        found = self._servers.get(base_url)
        if found is None:
            url = urlsplit(base_url)
            found = {}
            if url.hostname:
                found["server.address"] = url.hostname
                if url.port:
                    found["server.port"] = url.port
            self._servers[base_url] = found
        return found

    # server side

    async def serve(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    request_id: str) -> web.StreamResponse:
        """Run `handler` inside the request's SERVER span, continuing the client's trace
        (a malformed `traceparent` is ignored: a new trace starts)."""
        headers = request.headers
        parent: Context | None = None
        # Most requests carry no trace context: skip the propagators' parsing for them.
        if "traceparent" in headers or "baggage" in headers:
            parent = self.propagator.extract(headers)
            if not trace.get_current_span(parent).get_span_context().is_valid:
                parent = None  # malformed (or baggage alone): a new trace, sampled as one
        decide_here = parent is None and self.root_rate is not None
        if decide_here and not self.sample_root():
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        method = request.method
        attributes: dict[str, AttributeValue] = {
            "http.request.method": method, "url.path": request.path, "http.route": route,
            "bulwark.request_id": request_id}
        name = f"{method} {route}".rstrip()
        span = (self._root(name, SpanKind.SERVER, attributes) if decide_here
                else self._start(name, SpanKind.SERVER, attributes, parent))
        token = _current.set(span)
        try:
            resp = await handler(request)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(StatusCode.ERROR)
            raise
        else:
            status = resp.status
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(StatusCode.ERROR)
            return resp
        finally:
            _current.reset(token)
            span.end()

    def sample_root(self) -> bool:
        """Whether a trace starting here is recorded (always True when the SDK decides)."""
        rate = self.root_rate
        return rate is None or rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def event(self, name: str, attributes: Mapping[str, str | int | float]) -> None:
        """An event on the current request's span (retry, failover, breaker, continuation)."""
        span = _current.get()
        if span is not None and span.recording:
            span.add_event(name, attributes)

    # client side

    def attempt(self, metrics: AttemptMetrics, provider: Provider, chat: ChatRequest,
                upstream_model: str, number: int) -> AttemptMetrics | TracedAttempt | Passed:
        parent = _current.get()
        if parent is None:
            return metrics
        if not parent.recording:
            # Not sampled here: pass the caller's trace on unsampled, as W3C asks.
            return Passed(metrics, parent.traceparent())
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": _VENDOR.get(provider.kind, provider.kind),
            "gen_ai.request.model": upstream_model,
            "gen_ai.request.stream": chat.stream,
            "bulwark.provider": provider.name,
            "bulwark.model": chat.model,
            "bulwark.attempt": number,
        }
        attributes.update(self._server(provider.base_url))
        if (max_tokens := chat.max_output_tokens) is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        if isinstance(chat.temperature, float | int) and not isinstance(chat.temperature, bool):
            attributes["gen_ai.request.temperature"] = float(chat.temperature)
        if self.capture:
            attributes["gen_ai.input.messages"] = _messages(chat)
        # A child of a recorded span is recorded: every sampler offered here (parent-based,
        # or a trace-id ratio that already chose this trace id) decides so.
        ctx = parent.span_context
        span = Span(self, f"chat {upstream_model}", SpanKind.CLIENT,
                    context=SpanContext(ctx.trace_id, _new_id(64), is_remote=False,
                                        trace_flags=_SAMPLED, trace_state=ctx.trace_state),
                    parent=ctx, attributes=attributes)
        return TracedAttempt(metrics, span, capture=self.capture)

    def probe_span(self, provider: Provider) -> Span | None:
        """A span for one healthd probe (a root: probes belong to no request), or None when
        this trace is not sampled."""
        attributes: dict[str, AttributeValue] = {
            "gen_ai.provider.name": _VENDOR.get(provider.kind, provider.kind),
            "bulwark.provider": provider.name, "bulwark.health_check": provider.health_check}
        name = f"health_check {provider.name}"
        if self.root_rate is not None:
            return self._root(name, SpanKind.CLIENT, attributes) if self.sample_root() else None
        span = self._start(name, SpanKind.CLIENT, attributes)
        return span if span.recording else None

    def shutdown(self) -> None:
        """Flush what is queued, for at most SHUTDOWN_SEC; a dead collector loses it."""
        worker = threading.Thread(target=self.provider.shutdown, name="otel-shutdown",
                                  daemon=True)
        worker.start()
        worker.join(SHUTDOWN_SEC)


class Passed:
    """An attempt of a request that is not sampled here: metrics, and the caller's trace
    context passed upstream."""

    __slots__ = ("_m", "traceparent")
    watch: Callable[[AsyncGenerator[StreamEvent, None]],
                    AsyncGenerator[StreamEvent, None]] | None = None

    def __init__(self, metrics: AttemptMetrics, parent: str) -> None:
        self._m = metrics
        self.traceparent = parent

    def first_token(self, seconds: float) -> None:
        self._m.first_token(seconds)

    def succeeded(self, seconds: float, completion: ChatCompletion | None) -> None:
        self._m.succeeded(seconds, completion)

    def stream_done(self, seconds: float, tail: Sequence[Chunk]) -> None:
        self._m.stream_done(seconds, tail)

    def failed(self, err: UpstreamError, seconds: float) -> None:
        self._m.failed(err, seconds)

    def cancelled(self, seconds: float) -> None:
        self._m.cancelled(seconds)


class TracedAttempt:
    """One upstream attempt with its CLIENT span; ends the span exactly once."""

    def __init__(self, metrics: AttemptMetrics, span: Span, *, capture: bool) -> None:
        self._m = metrics
        self._span = span
        self._streaming = False
        self._text: list[str] = []
        self._capture = capture
        self.traceparent = span.traceparent()
        self.watch = self._watch if capture else None

    async def _watch(self, events: AsyncGenerator[StreamEvent, None]
                     ) -> AsyncGenerator[StreamEvent, None]:
        """Only with content capture on: collect the streamed text for the span."""
        try:
            async for ev in events:
                for choice in ev.chunk.choices:
                    if isinstance(choice.delta.content, str):
                        self._text.append(choice.delta.content)
                yield ev
        finally:
            await events.aclose()

    def first_token(self, seconds: float) -> None:
        self._m.first_token(seconds)
        self._streaming = True
        self._span.add_event("gen_ai.first_chunk", {"bulwark.ttft_s": seconds})

    def _response(self, response_id: str, model: str, finish: list[str],
                  input_tokens: int | None, output_tokens: int | None, *,
                  output: str | None) -> None:
        attributes: dict[str, AttributeValue] = {"gen_ai.response.id": response_id,
                                      "gen_ai.response.model": model}
        if finish:
            attributes["gen_ai.response.finish_reasons"] = finish
        if input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = input_tokens
        if output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = output_tokens
        if output is not None:
            attributes["gen_ai.output.messages"] = output
        self._span.set_attributes(attributes)
        self._span.end()

    def succeeded(self, seconds: float, completion: ChatCompletion | None) -> None:
        self._m.succeeded(seconds, completion)
        if completion is None:
            return
        usage = completion.usage
        finish = [c.finish_reason for c in completion.choices if c.finish_reason]
        output = None
        if self._capture:
            text = "".join(c.message.content or "" for c in completion.choices[:1])
            output = _output(text, finish[0] if finish else None)
        self._response(completion.id, completion.model, finish,
                       usage.prompt_tokens if usage else None,
                       usage.completion_tokens if usage else None, output=output)

    def stream_done(self, seconds: float, tail: Sequence[Chunk]) -> None:
        self._m.stream_done(seconds, tail)
        finish = [c.finish_reason for chunk in tail for c in chunk.choices if c.finish_reason]
        usage = next((c.usage for c in tail if c.usage is not None), None)
        last = tail[-1] if tail else None
        output = (_output("".join(self._text), finish[0] if finish else None)
                  if self._capture else None)
        self._response(last.id if last else "", last.model if last else "", finish,
                       usage.prompt_tokens if usage else None,
                       usage.completion_tokens if usage else None, output=output)

    def failed(self, err: UpstreamError, seconds: float) -> None:
        self._m.failed(err, seconds)
        attributes: dict[str, AttributeValue] = {"error.type": str(err.cls)}
        if err.status is not None:
            attributes["http.response.status_code"] = err.status
        self._span.set_attributes(attributes)
        self._span.set_status(StatusCode.ERROR, str(err.cls))
        if self._streaming:
            # The client already had part of the answer: the request failed too.
            server = _current.get()
            if server is not None and server.recording:
                server.set_attribute("error.type", str(err.cls))
                server.set_status(StatusCode.ERROR, "stream failed after its first byte")
        self._span.end()

    def cancelled(self, seconds: float) -> None:
        self._m.cancelled(seconds)
        self._span.set_attribute("error.type", "cancelled")
        self._span.end()
