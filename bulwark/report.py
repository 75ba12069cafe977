"""The reliability report: how each provider did over a period, from the history tables.

One function, `reliability_report(conn, since_sec)`, is the single source for
`python -m healthd report` and the admin endpoint (`/admin/reliability/reports/reliability`).
Per provider:

- availability: the share of healthd's probes that succeeded (`health_samples`). Probes
  run on a fixed period, so this is also the share of time the provider answered.
- breaker opens (`breaker_events` rows into "open"), outages (a closed breaker opening:
  failed half-open trials re-open the same outage and are not new ones), recoveries (an
  outage's breaker closing again) and the mean time to recover: the mean of open→closed
  durations of the outages that recovered inside the period (an outage that began before
  it counts from its real start).
- failures by class: the classified upstream failures web processes saw (`service_errors`),
  and the probe failures by class (`health_samples`).

Fleet-wide: fallbacks by kind (failover, model, cache, canned, queued) from
`fallback_events`, which web processes write in batches for every answer the first choice
could not give; and what users said of the answers (`feedback`).

Times come from the database's clock (`now()`), never from the caller's host.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Protocol

import msgspec

from bulwark.feedback import feedback_summary

#: The note shown while no table records how answers came about.

class Conn(Protocol):
    """An asyncpg connection or pool connection."""

    async def fetch(self, query: str, *args: object,
                    timeout: float | None = None) -> list[Any]: ...

    async def fetchval(self, query: str, *args: object, column: int = 0,
                       timeout: float | None = None) -> Any: ...

    async def fetchrow(self, query: str, *args: object,
                       timeout: float | None = None) -> Any: ...


_WINDOW = """
SELECT extract(epoch FROM now() - make_interval(secs => $1::float8))::float8 AS since,
       extract(epoch FROM now())::float8 AS until
"""

_AVAILABILITY = """
SELECT provider, count(*)::int AS probes, count(*) FILTER (WHERE ok)::int AS ok
FROM health_samples
WHERE at >= to_timestamp($1::float8)
GROUP BY provider
"""

_PROBE_FAILURES = """
SELECT provider, coalesce(error_class, 'unknown') AS error_class, count(*)::int AS n
FROM health_samples
WHERE at >= to_timestamp($1::float8) AND NOT ok
GROUP BY 1, 2
"""

# The events of the period, plus those of an outage still going on as the period starts
# (every event after each provider's last close before it), so that its recovery inside
# the period is measured from the real start.
_EVENTS = """
WITH last_close AS (
    SELECT provider, max(at) AS at FROM breaker_events
    WHERE at < to_timestamp($1::float8) AND to_state = 'closed'
    GROUP BY provider
)
SELECT e.provider, e.from_state, e.to_state, extract(epoch FROM e.at)::float8 AS at
FROM breaker_events e LEFT JOIN last_close c USING (provider)
WHERE e.at >= to_timestamp($1::float8) OR e.at > coalesce(c.at, '-infinity'::timestamptz)
ORDER BY e.provider, e.at, e.id
"""

_FAILURES = """
SELECT coalesce(provider, '') AS provider, error_class, count(*)::int AS n
FROM service_errors
WHERE at >= to_timestamp($1::float8)
GROUP BY 1, 2
"""

_PROVIDERS = "SELECT name FROM providers"

_FALLBACKS = """
SELECT kind, count(*)::int AS n FROM fallback_events
WHERE at >= to_timestamp($1::float8)
GROUP BY kind
"""


def _outages(events: list[Any], since: float) -> dict[str, Any]:
    """Opens, outages, recoveries and mean time to recover from one provider's events
    (in order; some may predate `since`, see _EVENTS)."""
    opens = outages = 0
    durations: list[float] = []
    started: float | None = None
    for e in events:
        in_period = e["at"] >= since
        if e["to_state"] == "open":
            if in_period:
                opens += 1
            if started is None:
                # A closed breaker opening, or the first event we know of an outage
                # already going on (its opening is older than retention).
                started = e["at"]
                if in_period and e["from_state"] in (None, "closed"):
                    outages += 1
        elif e["to_state"] == "closed" and started is not None:
            if in_period:
                durations.append(e["at"] - started)
            started = None
    return {
        "breaker_opens": opens,
        "outages": outages,
        "recoveries": len(durations),
        "mttr_sec": round(sum(durations) / len(durations), 3) if durations else None,
        "open_at_end": started is not None,
    }


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}


def duration_sec(text: str) -> float:
    """"24h", "30m", "7d", "90s", "1w" or plain seconds, as seconds (> 0)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration like 24h, 30m, 7d or 3600")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


async def reliability_report(conn: Conn, since_sec: float) -> dict[str, Any]:
    """How every provider did over the last `since_sec` seconds (see the module doc)."""
    window = (await conn.fetch(_WINDOW, float(since_sec)))[0]
    since, until = float(window["since"]), float(window["until"])
    names: set[str] = {r["name"] for r in await conn.fetch(_PROVIDERS)}

    availability = {r["provider"]: r for r in await conn.fetch(_AVAILABILITY, since)}
    probe_failures: dict[str, dict[str, int]] = defaultdict(dict)
    for r in await conn.fetch(_PROBE_FAILURES, since):
        probe_failures[r["provider"]][r["error_class"]] = r["n"]
    events: dict[str, list[Any]] = defaultdict(list)
    for r in await conn.fetch(_EVENTS, since):
        events[r["provider"]].append(r)
    failures: dict[str, dict[str, int]] = defaultdict(dict)
    for r in await conn.fetch(_FAILURES, since):
        failures[r["provider"]][r["error_class"]] = r["n"]
    # Failures with no provider (none could be tried) are the fleet's, not a provider's.
    fleet_failures = failures.pop("", {})
    names |= set(availability) | set(events) | set(failures)

    providers: dict[str, Any] = {}
    for name in sorted(names):
        a = availability.get(name)
        probes = a["probes"] if a is not None else 0
        ok = a["ok"] if a is not None else 0
        by_class = failures.get(name, {})
        providers[name] = {
            "availability": round(ok / probes, 6) if probes else None,
            "probes": probes,
            "probes_failed": probes - ok,
            **_outages(events.get(name, []), since),
            "failures": sum(by_class.values()),
            "failures_by_class": dict(sorted(by_class.items())),
            "probe_failures_by_class": dict(sorted(probe_failures.get(name, {}).items())),
        }

    report: dict[str, Any] = {
        "since": since,
        "until": until,
        "window_sec": float(since_sec),
        "providers": providers,
        "unrouted_failures_by_class": dict(sorted(fleet_failures.items())),
    }
    report["fallbacks_by_kind"] = {
        r["kind"]: r["n"] for r in await conn.fetch(_FALLBACKS, since)}
    report["feedback"] = msgspec.to_builtins(await feedback_summary(conn, float(since_sec)))
    return report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table for a terminal."""
    from datetime import UTC, datetime

    def ts(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    lines = [f"Reliability report, {ts(report['since'])} .. {ts(report['until'])}", ""]
    header = ("provider", "available", "probes", "opens", "outages", "recovered", "MTTR s",
              "open now", "failures")
    rows: list[tuple[str, ...]] = [header]
    for name, p in report["providers"].items():
        avail = "-" if p["availability"] is None else f"{100 * p['availability']:.2f}%"
        rows.append((name, avail, str(p["probes"]), str(p["breaker_opens"]),
                     str(p["outages"]), str(p["recoveries"]), _cell(p["mttr_sec"]),
                     "yes" if p["open_at_end"] else "no", str(p["failures"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    lines.append("")
    lines.append("Failures by class (requests / probes):")
    for name, p in report["providers"].items():
        classes = sorted(set(p["failures_by_class"]) | set(p["probe_failures_by_class"]))
        if not classes:
            continue
        parts = [f"{c} {p['failures_by_class'].get(c, 0)}/{p['probe_failures_by_class'].get(c, 0)}"
                 for c in classes]
        lines.append(f"  {name}: " + ", ".join(parts))
    if report["unrouted_failures_by_class"]:
        lines.append("  (no provider): " + ", ".join(
            f"{c} {n}" for c, n in report["unrouted_failures_by_class"].items()))
    lines.append("")
    fallbacks = report["fallbacks_by_kind"]
    lines.append("Fallbacks by kind: " + (", ".join(
        f"{k} {n}" for k, n in sorted(fallbacks.items())) or "none"))
    fb = report["feedback"]
    lines.append(f"Feedback: {fb['count']} rating(s)" + (
        f", mean score {fb['score_mean']:.2f} (0..1)" if fb["score_mean"] is not None else ""))
    return "\n".join(lines) + "\n"
