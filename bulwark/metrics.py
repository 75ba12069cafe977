"""The web process's Prometheus metrics: every name, and the cheap ways to feed them.

Names follow Prometheus's rules (FACTS): one prefix `bulwark_`, base units (seconds,
tokens), `_total` on counters, and labels from bounded sets only — configured provider and
model names, error classes, status codes. Never a request id, a client key, user text or a
model string a client made up: `model_label()` maps anything unconfigured to "unknown".

In `python -m service` the values live in prometheus_client's multiprocess files
(`bulwark.multiproc.prepare` chose the directory before this module was imported) and
`render()` sums every web process of the host; anywhere else (tests in one process) they
live in this process and `render()` reads the default registry.

The request path must stay cheap (docs/PERFORMANCE.md): `.labels()` costs about a
microsecond and a multiprocess increment is a lock, a `getpid()` and an mmap write (1–1.5 µs;
a histogram observation two of them), some ten per request. So the hot paths use children
bound once per provider/model (`AttemptMetrics`, `RequestMetrics`), looked up in a plain
dict, and count into plain floats in this process (`Buffered*`); `flush()` moves the sums
into prometheus_client once a second (service/observe.py's sampler) and before this process
renders a scrape. Another process's latest second may be missing from a scrape; nothing is
lost (its next flush, or its exit, writes it).

Metrics other parts of the gateway feed (cache, jobs, dead-letter queue, WebSocket, rate
limits, degradation) are defined here too, with a zero sample for every label value known
up front, so that dashboards and alerts find a series before the first event.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Final

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as _mp

from bulwark.errors import ErrorClass, UpstreamError
from bulwark.wire import ChatCompletion, Chunk, Usage

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: The label of a model nobody configured (a client's typo must not become a series).
UNKNOWN: Final = "unknown"

#: True when this process writes multiprocess files (python -m service).
MULTIPROCESS: Final = bool(getattr(values.ValueClass, "_multiprocess", False))

# Buckets. Whole requests and attempts: from a cached answer (tens of ms) to a long stream
# (minutes). Time to first token: a healthy provider answers in 0.2–2 s. Retry delays:
# full jitter from 0 up to the backoff cap and Retry-After values (a few seconds).
_REQUEST_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# -- requests (contract names) ------------------------------------------------------------------

REQUESTS = Counter(
    "bulwark_requests_total",
    "Client requests answered, by API, model, streaming and HTTP status. A stream that failed "
    "after its first byte counts with the status of its final error event; 499: the client "
    "went away.",
    ["api", "model", "stream", "code"])
REQUEST_DURATION = Histogram(
    "bulwark_request_duration_seconds",
    "Time from the request to the last byte of its answer.",
    ["api", "model", "stream"], buckets=_REQUEST_BUCKETS)
FALLBACKS = Counter(
    "bulwark_fallback_total",
    "Answers that did not come from the first provider tried, by kind "
    "(failover, model, cache, canned, queued).",
    ["model", "kind"])
FALLBACK_KINDS: Final = ("failover", "model", "cache", "canned", "queued")
CONTINUATIONS = Counter(
    "bulwark_stream_continuations_total",
    "Streams continued by another provider after theirs failed mid-answer, by the provider "
    "that took over.", ["provider"])

# -- upstream attempts ---------------------------------------------------------------------------

UPSTREAM_ATTEMPTS = Counter(
    "bulwark_upstream_attempts_total",
    "Upstream attempts, by provider, model and result: ok, an error class "
    "(bulwark.errors.ErrorClass), or cancelled.",
    ["provider", "model", "result"])
UPSTREAM_DURATION = Histogram(
    "bulwark_upstream_attempt_duration_seconds",
    "Duration of one upstream attempt (a whole answer, or a stream to its end).",
    ["provider"], buckets=_REQUEST_BUCKETS)
TTFT = Histogram(
    "bulwark_time_to_first_token_seconds",
    "Time from the start of a streaming attempt to the provider's first content chunk.",
    ["provider", "model"], buckets=_TTFT_BUCKETS)
RETRIES = Counter(
    "bulwark_upstream_retries_total",
    "Attempts that retried the same provider after a failure.", ["provider"])
RETRY_DELAY = Histogram(
    "bulwark_upstream_retry_delay_seconds",
    "Backoff (or Retry-After) waited before a retry.", ["provider"], buckets=_DELAY_BUCKETS)
TOKENS = Counter(
    "bulwark_upstream_tokens_total",
    "Tokens the providers reported in their usage, by direction (input, output). Streams "
    "report usage only when the client asked for it (stream_options.include_usage).",
    ["provider", "model", "type"])

# -- breakers and routing ------------------------------------------------------------------------

BREAKER_STATE = Gauge(
    "bulwark_circuit_breaker_state",
    "A provider's breaker: 0 closed, 1 half-open, 2 open (the most open of the host's web "
    "processes).", ["provider"], multiprocess_mode="livemax")
BREAKER_STATES: Final = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
BREAKER_TRANSITIONS = Counter(
    "bulwark_circuit_breaker_transitions_total",
    "Breaker moves seen by web processes, by the state moved to.", ["provider", "to_state"])
AVAILABLE_PROVIDERS = Gauge(
    "bulwark_model_available_providers",
    "Providers of a model that may be sent traffic now: breaker not open and not reported "
    "unhealthy by healthd.", ["model"], multiprocess_mode="livemax")
CONFIGURED_PROVIDERS = Gauge(
    "bulwark_model_providers",
    "Providers configured for a model.", ["model"], multiprocess_mode="livemax")

# -- fleet state ---------------------------------------------------------------------------------

DEGRADATION = Gauge(
    "bulwark_degradation_level",
    "The fleet's degradation level: 0 normal, 1 minor, 2 moderate, 3 severe, 4 critical.",
    multiprocess_mode="livemax")
DEGRADATION_LEVELS: Final = ("normal", "minor", "moderate", "severe", "critical")
HEALTHD_AGE = Gauge(
    "bulwark_healthd_heartbeat_age_seconds",
    "Age of healthd's last heartbeat on the database clock, as web processes see it "
    "(+Inf: never seen).", multiprocess_mode="livemax")
BUS_RTT = Histogram(
    "bulwark_bus_heartbeat_rtt_seconds",
    "Round trip of the bus's heartbeat query on its LISTEN connection: the path every "
    "notification takes, so a lower bound of propagation lag.", buckets=_RTT_BUCKETS)
BUS_LAST_HEARTBEAT = Gauge(
    "bulwark_bus_last_heartbeat_timestamp_seconds",
    "Unix time of the last answered heartbeat on the LISTEN connection (the oldest of the "
    "host's web processes): every notification committed before it has been received.",
    multiprocess_mode="livemin")
BUS_RESYNCS = Counter(
    "bulwark_bus_resyncs_total",
    "Snapshot reloads of the shared state (reconnects, seq gaps, overflows).")
BUS_RECONNECTS = Counter(
    "bulwark_bus_reconnects_total", "Reconnects of the bus's LISTEN connection.")
BUS_APPLIED = Counter(
    "bulwark_bus_notifications_total", "Notifications applied to the in-memory view.")
WEB_PROCESSES = Gauge(
    "bulwark_web_processes", "Web processes alive on this host.", multiprocess_mode="livesum")

# -- other parts of the gateway (cache, jobs, DLQ, WebSocket, rate limits) ------------------------

DLQ_MESSAGES = Gauge(
    "bulwark_dlq_messages", "Jobs in the dead-letter queue (status dead).",
    multiprocess_mode="livemax")
JOBS = Gauge(
    "bulwark_jobs", "Jobs by current status (from the jobs table).", ["status"],
    multiprocess_mode="livemax")
JOB_STATUSES: Final = ("queued", "running", "succeeded", "failed", "dead", "cancelled")
JOB_TRANSITIONS = Counter(
    "bulwark_job_transitions_total", "Jobs that reached a status.", ["status"])
CACHE_LOOKUPS = Counter(
    "bulwark_cache_lookups_total", "Answer-cache lookups, by result (hit, miss).",
    ["model", "result"])
WEBSOCKETS = Gauge(
    "bulwark_websocket_connections", "Open WebSocket connections.", multiprocess_mode="livesum")
RATE_LIMITED = Counter(
    "bulwark_rate_limited_total", "Requests refused for a client key's limit, by limit "
    "(requests, tokens).", ["limit"])


def model_label(model: str, configured: Iterable[str]) -> str:
    return model if model in configured else UNKNOWN


def degradation_value(level: str) -> float:
    try:
        return float(DEGRADATION_LEVELS.index(level))
    except ValueError:
        return 0.0


def initialise(providers: dict[str, Sequence[str]]) -> None:
    """A zero sample for every label value known at start (providers → their models), so
    that every series a dashboard or an alert reads exists before its first event."""
    models = sorted({m for ms in providers.values() for m in ms})
    for name, served in providers.items():
        BREAKER_STATE.labels(name).set(0.0)
        RETRIES.labels(name)
        UPSTREAM_DURATION.labels(name)
        RETRY_DELAY.labels(name)
        CONTINUATIONS.labels(name)
        for to in BREAKER_STATES:
            BREAKER_TRANSITIONS.labels(name, to)
        for model in served:
            UPSTREAM_ATTEMPTS.labels(name, model, "ok")
            TTFT.labels(name, model)
            for direction in ("input", "output"):
                TOKENS.labels(name, model, direction)
    for model in models:
        for stream in ("false", "true"):
            REQUESTS.labels("chat", model, stream, "200")
            REQUEST_DURATION.labels("chat", model, stream)
        for kind in FALLBACK_KINDS:
            FALLBACKS.labels(model, kind)
        for result in ("hit", "miss"):
            CACHE_LOOKUPS.labels(model, result)
        CONFIGURED_PROVIDERS.labels(model).set(
            sum(model in served for served in providers.values()))
        AVAILABLE_PROVIDERS.labels(model).set(
            sum(model in served for served in providers.values()))
    for status in JOB_STATUSES:
        JOBS.labels(status).set(0.0)
        JOB_TRANSITIONS.labels(status)
    for limit in ("requests", "tokens"):
        RATE_LIMITED.labels(limit)
    DLQ_MESSAGES.set(0.0)
    WEBSOCKETS.set(0.0)
    DEGRADATION.set(0.0)
    WEB_PROCESSES.set(1.0)


# -- the hot paths -------------------------------------------------------------------------------

_BUFFERS: list[BufferedCounter | BufferedHistogram] = []


class BufferedCounter:
    """A counter child counted in this process; `flush()` adds the sum to the child."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.pending = 0.0
        _BUFFERS.append(self)

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)


class BufferedHistogram:
    """A histogram child observed in this process: per-bucket counts and the sum, added to
    the child's values on `flush()` (prometheus_client stores buckets non-cumulatively, one
    value per bucket, as `_buckets`/`_sum` — the same values its `observe` increments)."""

    __slots__ = ("_bounds", "child", "counts", "total")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self._bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self._bounds)
        self.total = 0.0
        _BUFFERS.append(self)

    def observe(self, amount: float) -> None:
        self.total += amount
        # First bucket whose bound is >= amount: Prometheus's `le`. The last bound is +Inf.
        self.counts[bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts, total, self.total = [0] * len(counts), self.total, 0.0
        self.child._sum.inc(total)
        for i, n in enumerate(counts):
            if n:
                self.child._buckets[i].inc(n)


def flush() -> None:
    """Move every buffered count into prometheus_client (call on the event loop's thread)."""
    for buffer in _BUFFERS:
        buffer.flush()



class AttemptMetrics:
    """The children of one (provider, model), bound once; also the `Attempt` the dispatcher
    talks to when tracing is off (nothing per attempt is allocated)."""

    __slots__ = ("_failed", "cancelled_", "duration", "model", "ok", "provider",
                 "tokens_in", "tokens_out", "ttft")
    traceparent: str | None = None
    watch: None = None

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.ok = BufferedCounter(UPSTREAM_ATTEMPTS.labels(provider, model, "ok"))
        self.cancelled_ = UPSTREAM_ATTEMPTS.labels(provider, model, "cancelled")
        self.duration = BufferedHistogram(UPSTREAM_DURATION.labels(provider))
        self.ttft = BufferedHistogram(TTFT.labels(provider, model))
        self.tokens_in = BufferedCounter(TOKENS.labels(provider, model, "input"))
        self.tokens_out = BufferedCounter(TOKENS.labels(provider, model, "output"))
        self._failed: dict[ErrorClass, Counter] = {}

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def succeeded(self, seconds: float, completion: ChatCompletion | None) -> None:
        """`completion` is None for an answer that is no chat completion (embeddings)."""
        self.ok.inc()
        self.duration.observe(seconds)
        if completion is not None and completion.usage is not None:
            self._usage(completion.usage)

    def stream_done(self, seconds: float, tail: Sequence[Chunk]) -> None:
        self.ok.inc()
        self.duration.observe(seconds)
        for chunk in tail:
            if chunk.usage is not None:
                self._usage(chunk.usage)
                break

    def failed(self, err: UpstreamError, seconds: float) -> None:
        child = self._failed.get(err.cls)
        if child is None:
            child = self._failed[err.cls] = UPSTREAM_ATTEMPTS.labels(
                self.provider, self.model, str(err.cls))
        child.inc()
        self.duration.observe(seconds)

    def cancelled(self, seconds: float) -> None:
        self.cancelled_.inc()
        self.duration.observe(seconds)

    def _usage(self, usage: Usage) -> None:
        if usage.prompt_tokens:
            self.tokens_in.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.tokens_out.inc(usage.completion_tokens)


class RequestMetrics:
    """Counts finished client requests of one API; children cached per label set."""

    __slots__ = ("_counts", "_durations", "_fallbacks", "api")

    def __init__(self, api: str) -> None:
        self.api = api
        self._counts: dict[tuple[str, bool, int], BufferedCounter] = {}
        self._durations: dict[tuple[str, bool], BufferedHistogram] = {}
        self._fallbacks: dict[tuple[str, str], Counter] = {}

    def done(self, model: str, stream: bool, code: int, started: float,
             fallback: str = "none") -> None:
        """`model` must be a configured name or UNKNOWN; `started` is a perf_counter()."""
        seconds = time.perf_counter() - started
        count = self._counts.get((model, stream, code))
        if count is None:
            count = self._counts[(model, stream, code)] = BufferedCounter(REQUESTS.labels(
                self.api, model, "true" if stream else "false", str(code)))
        count.inc()
        duration = self._durations.get((model, stream))
        if duration is None:
            duration = self._durations[(model, stream)] = BufferedHistogram(
                REQUEST_DURATION.labels(self.api, model, "true" if stream else "false"))
        duration.observe(seconds)
        if fallback != "none":
            self.fallback(model, fallback)

    def fallback(self, model: str, kind: str) -> None:
        child = self._fallbacks.get((model, kind))
        if child is None:
            child = self._fallbacks[(model, kind)] = FALLBACKS.labels(model, kind)
        child.inc()


CHAT: Final = RequestMetrics("chat")


def breaker_moved(provider: str, to_state: str) -> None:
    BREAKER_TRANSITIONS.labels(provider, to_state).inc()
    BREAKER_STATE.labels(provider).set(BREAKER_STATES.get(to_state, 0.0))


# -- the scrape ----------------------------------------------------------------------------------

_registry: CollectorRegistry | None = None


def render() -> bytes:
    """The Prometheus text of every web process of this host (or of this process alone).
    Reads files only: call `flush()` first, on the event loop's thread."""
    global _registry  # noqa: PLW0603 - one collector per process, built on first scrape
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    if _registry is None:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        _registry = registry
    return generate_latest(_registry)
