"""Recent history for people: the last probes, breaker changes and failures per provider.

Read by the status page and `/health/detailed` (never by the request path) from the
tables healthd and web append to: `health_samples`, `breaker_events`, `service_errors`.
Everything returned is safe to show to anyone who can reach the page: no request ids, no
upstream error text (`service_errors.detail`), no hostnames — only classes, counts,
timings and the gateway's own breaker reasons.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

#: Probes shown per provider: enough for a sparkline of the last minutes at the default
#: 10 s interval, small enough for one SSE event.
PROBES_PER_PROVIDER = 20
#: Only probes this recent count as "recent" (older ones describe another situation).
PROBE_WINDOW_SEC = 900.0
#: Percentiles over the last five minutes: the same window as the error mix.
PERCENTILE_WINDOW_SEC = 300.0
INCIDENTS_LIMIT = 20
INCIDENT_WINDOW_SEC = 86_400.0
ERROR_WINDOW_SEC = 900.0


class Fetcher(Protocol):
    """An asyncpg connection or pool connection (only `fetch` is used)."""

    async def fetch(self, query: str, *args: object,
                    timeout: float | None = None) -> list[Any]: ...


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    at: float  # unix epoch seconds
    ok: bool
    latency_ms: float | None
    ttft_ms: float | None
    error_class: str | None
    status: int | None


class ProbeStats(msgspec.Struct, frozen=True, kw_only=True):
    samples: int
    ok: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    """One breaker change, fleet-wide (`breaker_events`)."""

    at: float
    provider: str
    from_state: str | None
    to_state: str
    reason: str
    #: "web", "healthd", "admin", …: who, without the host and pid.
    by: str


class ErrorCount(msgspec.Struct, frozen=True, kw_only=True):
    provider: str | None
    error_class: str
    count: int
    last_at: float


class History(msgspec.Struct, frozen=True, kw_only=True):
    probes: dict[str, list[Probe]]
    stats: dict[str, ProbeStats]
    incidents: list[Incident]
    errors: list[ErrorCount]
    errors_window_sec: float = ERROR_WINDOW_SEC


EMPTY = History(probes={}, stats={}, incidents=[], errors=[])

_PROBES = """
SELECT provider, extract(epoch FROM at)::float8 AS at, ok, latency_ms, ttft_ms, error_class,
       status
FROM (
    SELECT *, row_number() OVER (PARTITION BY provider ORDER BY at DESC) AS n
    FROM health_samples
    WHERE at > now() - make_interval(secs => $1::float8)
) s
WHERE n <= $2::int
ORDER BY provider, at
"""

_STATS = """
SELECT provider, count(*)::int AS samples, count(*) FILTER (WHERE ok)::int AS ok,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE ok) AS lat50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE ok) AS lat95,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ttft_ms) FILTER (WHERE ok) AS ttft50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY ttft_ms) FILTER (WHERE ok) AS ttft95
FROM health_samples
WHERE at > now() - make_interval(secs => $1::float8)
GROUP BY provider
"""

_INCIDENTS = """
SELECT extract(epoch FROM at)::float8 AS at, provider, from_state, to_state, reason, source
FROM breaker_events
WHERE at > now() - make_interval(secs => $1::float8)
ORDER BY at DESC, id DESC
LIMIT $2::int
"""

_ERRORS = """
SELECT provider, error_class, count(*)::int AS n, extract(epoch FROM max(at))::float8 AS last_at
FROM service_errors
WHERE at > now() - make_interval(secs => $1::float8)
GROUP BY provider, error_class
ORDER BY n DESC, provider, error_class
"""


def who(source: str) -> str:
    """The kind of writer of a breaker event ("web:host:1234" -> "web")."""
    return source.split(":", 1)[0] or "unknown"


async def recent_history(conn: Fetcher, *, timeout: float | None = None) -> History:
    """The recent history of every provider, in four short indexed queries."""
    probes: dict[str, list[Probe]] = {}
    for r in await conn.fetch(_PROBES, PROBE_WINDOW_SEC, PROBES_PER_PROVIDER, timeout=timeout):
        probes.setdefault(r["provider"], []).append(Probe(
            at=r["at"], ok=r["ok"], latency_ms=r["latency_ms"], ttft_ms=r["ttft_ms"],
            error_class=r["error_class"], status=r["status"]))
    stats = {
        r["provider"]: ProbeStats(
            samples=r["samples"], ok=r["ok"], latency_p50_ms=r["lat50"],
            latency_p95_ms=r["lat95"], ttft_p50_ms=r["ttft50"], ttft_p95_ms=r["ttft95"])
        for r in await conn.fetch(_STATS, PERCENTILE_WINDOW_SEC, timeout=timeout)
    }
    incidents = [
        Incident(at=r["at"], provider=r["provider"], from_state=r["from_state"],
                 to_state=r["to_state"], reason=r["reason"], by=who(r["source"]))
        for r in await conn.fetch(_INCIDENTS, INCIDENT_WINDOW_SEC, INCIDENTS_LIMIT,
                                  timeout=timeout)
    ]
    errors = [
        ErrorCount(provider=r["provider"], error_class=r["error_class"], count=r["n"],
                   last_at=r["last_at"])
        for r in await conn.fetch(_ERRORS, ERROR_WINDOW_SEC, timeout=timeout)
    ]
    return History(probes=probes, stats=stats, incidents=incidents, errors=errors)

