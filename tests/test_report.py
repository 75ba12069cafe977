"""The reliability report from the history tables of a real Postgres, as a function and as
`python -m healthd report` (issue 8, item 6)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import asyncpg
import pytest

from bulwark.report import reliability_report
from healthd.report import parse_duration
from tests.procs import ROOT


async def seed(db: asyncpg.Connection) -> None:
    """Two providers' last day, timed relative to the database's clock."""
    await db.execute("""
        INSERT INTO providers (name, kind, base_url, models) VALUES
            ('alpha', 'openai', 'http://a', '{}'), ('beta', 'openai', 'http://b', '{}'),
            ('gamma', 'openai', 'http://c', '{}')""")
    # alpha: 8 good probes, 2 failed (server_error) within the hour; one failure 2 days ago.
    await db.execute("""
        INSERT INTO health_samples (provider, at, ok, latency_ms, error_class)
        SELECT 'alpha', now() - make_interval(mins => g), g > 2, 12.5,
               CASE WHEN g <= 2 THEN 'server_error' END
        FROM generate_series(1, 10) g""")
    await db.execute("""INSERT INTO health_samples (provider, at, ok, error_class)
                        VALUES ('alpha', now() - interval '2 days', false, 'timeout_total'),
                               ('beta', now() - interval '5 minutes', true, NULL)""")
    # alpha: an outage that began before the period (25 h ago), whose half-open trial
    # failed inside it and which recovered 23 h ago (2 h long); then a 60 s outage.
    # beta: opened 10 minutes ago and still open.
    await db.execute("""
        INSERT INTO breaker_events (provider, from_state, to_state, reason, source, at) VALUES
        ('alpha', 'closed', 'open', 'x', 'web:h:1', now() - interval '25 hours'),
        ('alpha', 'open', 'half_open', 'x', 'healthd', now() - interval '24 hours 30 minutes'),
        ('alpha', 'half_open', 'open', 'x', 'healthd', now() - interval '23 hours 54 minutes'),
        ('alpha', 'open', 'half_open', 'x', 'healthd', now() - interval '23 hours 30 minutes'),
        ('alpha', 'half_open', 'closed', 'x', 'healthd', now() - interval '23 hours'),
        ('alpha', 'closed', 'open', 'x', 'web:h:1', now() - interval '2 hours'),
        ('alpha', 'open', 'half_open', 'x', 'healthd', now() - interval '7170 seconds'),
        ('alpha', 'half_open', 'closed', 'x', 'healthd', now() - interval '1 hour 59 minutes'),
        ('beta', 'closed', 'open', 'x', 'web:h:2', now() - interval '10 minutes')""")
    await db.execute("""
        INSERT INTO service_errors (at, provider, request_id, model, error_class, status) VALUES
        (now() - interval '1 hour', 'alpha', 'req_1', 'default', 'server_error', 503),
        (now() - interval '1 hour', 'alpha', 'req_2', 'default', 'server_error', 503),
        (now() - interval '1 hour', 'alpha', 'req_3', 'default', 'server_error', 530),
        (now() - interval '1 hour', 'alpha', 'req_4', 'default', 'timeout_first_token', NULL),
        (now() - interval '9 minutes', 'beta', 'req_5', 'default', 'network_refused', NULL),
        (now() - interval '9 minutes', 'beta', 'req_6', 'default', 'network_refused', NULL),
        (now() - interval '9 minutes', NULL, 'req_7', 'default', 'no_provider', NULL),
        (now() - interval '3 days', 'alpha', 'req_8', 'default', 'rate_limit', 429)""")


async def test_report_per_provider(db: asyncpg.Connection) -> None:
    """Availability from probes, opens/outages/recoveries and MTTR from breaker events (an
    outage begun before the period counts from its real start), failures by class from
    service_errors, nothing older than the period; no fallback recorded, none reported."""
    await seed(db)
    report = await reliability_report(db, 24 * 3600)
    assert report["until"] - report["since"] == pytest.approx(24 * 3600)
    alpha, beta, gamma = (report["providers"][n] for n in ("alpha", "beta", "gamma"))
    assert alpha["availability"] == pytest.approx(0.8)
    assert (alpha["probes"], alpha["probes_failed"]) == (10, 2)
    assert alpha["probe_failures_by_class"] == {"server_error": 2}
    assert (alpha["breaker_opens"], alpha["outages"], alpha["recoveries"]) == (2, 1, 2)
    assert alpha["mttr_sec"] == pytest.approx((2 * 3600 + 60) / 2, abs=0.01)
    assert alpha["open_at_end"] is False
    assert alpha["failures_by_class"] == {"server_error": 3, "timeout_first_token": 1}
    assert alpha["failures"] == 4
    assert (beta["breaker_opens"], beta["outages"], beta["recoveries"]) == (1, 1, 0)
    assert beta["mttr_sec"] is None and beta["open_at_end"] is True
    assert beta["availability"] == 1.0
    assert beta["failures_by_class"] == {"network_refused": 2}
    # A configured provider with no history at all is listed, with nothing measured.
    assert gamma["availability"] is None and gamma["breaker_opens"] == 0
    assert report["unrouted_failures_by_class"] == {"no_provider": 1}
    assert report["fallbacks_by_kind"] == {}

    short = await reliability_report(db, 30 * 60)
    assert short["providers"]["alpha"]["breaker_opens"] == 0
    assert short["providers"]["alpha"]["mttr_sec"] is None
    assert short["providers"]["beta"]["open_at_end"] is True


async def test_report_counts_fallbacks_by_kind_and_feedback(db: asyncpg.Connection) -> None:
    """Fallbacks by kind are counted from `fallback_events`, and feedback is summarised,
    both within the period only."""
    await db.execute("INSERT INTO fallback_events (kind, model, at) VALUES "
                     "('failover', 'default', now()), ('failover', 'default', now()), "
                     "('canned', 'default', now()), "
                     "('cache', 'default', now() - interval '2 days')")
    await db.execute("INSERT INTO feedback (request_id, rating, scale, score) VALUES "
                     "('req_1', 1, 'thumbs', 1.0), ('req_2', -1, 'thumbs', 0.0)")
    report = await reliability_report(db, 3600)
    assert report["fallbacks_by_kind"] == {"failover": 2, "canned": 1}
    assert report["feedback"]["count"] == 2


def test_durations_parse() -> None:
    """--since takes 24h, 30m, 7d, 1w, 90s or plain seconds; anything else is refused."""
    assert [parse_duration(t) for t in ("24h", "30m", "7d", "1w", "90s", "3600", "1.5h")] == [
        86_400, 1800, 604_800, 604_800, 90, 3600, 5400]
    for bad in ("", "0", "h", "-5m", "24 hours", "5y"):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)


async def run_cli(dsn: str | None, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "healthd", "report", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_prints_the_report(db: asyncpg.Connection, pg_clean: str) -> None:
    """`python -m healthd report --since 24h` prints a table; `--json` prints what
    reliability_report returns; a bad period or no DATABASE_URL exits 2 with a message."""
    await seed(db)
    code, out, err = await run_cli(pg_clean, "--since", "24h")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:6]}
    assert rows["alpha"][1:8] == ["80.00%", "10", "2", "1", "2", "3630.0", "no"]
    assert rows["beta"][1] == "100.00%" and rows["beta"][7] == "yes"
    assert "alpha: server_error 3/2, timeout_first_token 1/0" in out
    assert "Fallbacks by kind: none" in out
    assert "Feedback: 0 rating(s)" in out

    code, out, err = await run_cli(pg_clean, "--since", "24h", "--json")
    assert code == 0, err
    printed = json.loads(out)
    direct = await reliability_report(db, 24 * 3600)
    assert printed["providers"] == direct["providers"]

    code, _, err = await run_cli(pg_clean, "--since", "yesterday")
    assert code == 2 and "not a duration" in err
    code, _, err = await run_cli(None)
    assert code == 2 and "DATABASE_URL is not set" in err
