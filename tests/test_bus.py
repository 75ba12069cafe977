"""The state bus against a real Postgres: every process converges on the same rows."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from bulwark.bus import Bus, HealthSample, ServiceError, prune, retention_days
from bulwark.config import ProviderConfig, Settings, resolve
from bulwark.pgembed import EmbeddedPostgres
from bulwark.state import Health, StateRow, View, row_encoder
from schema.migrate import migrate
from tests.pg import eventually, run_sync, throwaway_dir, truncate_state

pytestmark = pytest.mark.slow

MakeBus = Callable[..., Awaitable[Bus]]


def bus_factory(default_dsn: str) -> tuple[MakeBus, list[Bus]]:
    made: list[Bus] = []

    async def make(name: str, *, dsn: str | None = None, **kw: Any) -> Bus:
        # A short heartbeat keeps dead-listener detection well inside the test's bounds.
        kw.setdefault("heartbeat_sec", 0.2)
        kw.setdefault("heartbeat_timeout_sec", 0.5)
        kw.setdefault("reconnect_max_sec", 0.5)
        bus = Bus(dsn or default_dsn, View(), name=name, **kw)
        made.append(bus)
        await bus.start()
        return bus

    return make, made


@pytest.fixture
async def make_bus(pg_clean: str) -> AsyncIterator[MakeBus]:
    make, made = bus_factory(pg_clean)
    yield make
    for bus in made:
        await bus.close()


@pytest.fixture(scope="module")
def own_pg() -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A private cluster this module may stop, restart and SIGSTOP backends of."""
    data_dir = throwaway_dir("bulwark-bus-pg-")
    cluster = EmbeddedPostgres(data_dir, throwaway=True)
    try:
        dsn = cluster.start()
        run_sync(migrate(dsn))
        yield cluster, dsn
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def make_own_bus(own_pg: tuple[EmbeddedPostgres, str]) -> AsyncIterator[MakeBus]:
    cluster, dsn = own_pg
    await asyncio.to_thread(cluster.start)
    await truncate_state(dsn)
    make, made = bus_factory(dsn)
    yield make
    for bus in made:
        await bus.close()


async def sql(dsn: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def seq_of(bus: Bus, provider: str) -> int:
    row = bus.view.rows.get(provider)
    return row.seq if row is not None else 0


async def test_publish_reaches_every_view(make_bus: MakeBus, pg_clean: str) -> None:
    """A publish in one Bus lands in another Bus's view (and its own) at seq + 1."""
    a = await make_bus("a")
    b = await make_bus("b")
    assert a.connected and b.connected

    row = await a.publish("alpha", breaker="open", reason="5 failures", source="web-1", open_for=30)
    assert row is not None
    assert (row.seq, row.breaker, row.health, row.updated_by) == (
        1,
        "open",
        Health.UNKNOWN,
        "web-1",
    )
    assert row.open_for is not None and 25 < row.open_for <= 30
    await eventually(lambda: b.view.rows.get("alpha") == row and a.view.rows.get("alpha") == row)

    row2 = await b.publish("alpha", health="degraded", reason="slow pings", source="healthd")
    assert row2 is not None
    assert (row2.seq, row2.breaker, row2.health) == (2, "open", Health.DEGRADED)
    assert row2.open_for is not None  # a health-only write keeps the breaker's deadline
    await eventually(lambda: seq_of(a, "alpha") == 2 and seq_of(b, "alpha") == 2)
    assert a.view.rows["alpha"].health is Health.DEGRADED
    assert (a.gaps, b.gaps, a.applied, b.applied) == (0, 0, 2, 2)

    stored = await sql(pg_clean, "SELECT seq, health, breaker, updated_by FROM provider_state")
    assert [tuple(r) for r in stored] == [(2, "degraded", "open", "healthd")]
    # A provider nobody wrote about before was implicitly closed.
    events = await sql(pg_clean, "SELECT from_state, to_state, source FROM breaker_events")
    assert [tuple(e) for e in events] == [("closed", "open", "web-1")]


async def test_breaker_events_record_transitions_only(make_bus: MakeBus, pg_clean: str) -> None:
    """breaker_events gets a row when the breaker moves, none for repeats or health writes."""
    a = await make_bus("a")
    for breaker, health in [
        ("closed", None),
        ("open", None),
        ("open", None),
        (None, "unhealthy"),
        ("half_open", None),
        ("closed", "healthy"),
    ]:
        assert await a.publish("alpha", breaker=breaker, health=health, reason="r", source="s")
    events = await sql(
        pg_clean, "SELECT from_state, to_state, source FROM breaker_events ORDER BY id"
    )
    assert [tuple(e) for e in events] == [
        ("closed", "open", "s"),
        ("open", "half_open", "s"),
        ("half_open", "closed", "s"),
    ]
    stored = await sql(pg_clean, "SELECT seq, open_until FROM provider_state")
    assert [tuple(r) for r in stored] == [(6, None)]


async def test_seq_gap_reloads_snapshot(make_bus: MakeBus, pg_clean: str) -> None:
    """A notification whose seq skips one makes the Bus reload the whole snapshot."""
    a = await make_bus("a")
    b = await make_bus("b")
    await a.publish("alpha", health="healthy", reason="ok", source="healthd")
    await eventually(lambda: seq_of(b, "alpha") == 1)

    conn = await asyncpg.connect(pg_clean)
    try:
        # Write seq 2 without its notification, as if b had missed it.
        await conn.execute(
            "UPDATE provider_state SET seq = seq + 1, health = 'unhealthy' WHERE provider = 'alpha'"
        )
        async with conn.transaction():
            rec = await conn.fetchrow(
                "UPDATE provider_state SET seq = seq + 1, reason = 'third'"
                " WHERE provider = 'alpha' RETURNING seq, health, breaker"
            )
            assert rec is not None and rec["seq"] == 3
            # The notified row claims the old health: only a reload can learn 'unhealthy'.
            payload = StateRow(provider="alpha", health=Health.HEALTHY, reason="third", seq=3)
            await conn.execute(
                "SELECT pg_notify('provider_state', $1)", row_encoder.encode(payload).decode()
            )
    finally:
        await conn.close()

    await eventually(lambda: seq_of(b, "alpha") == 3)
    assert b.view.rows["alpha"].health is Health.UNHEALTHY
    assert b.gaps == 1
    assert b.reloads == 2  # the start-up snapshot, then the gap's


async def test_terminated_listener_reconnects_and_reloads(make_bus: MakeBus, pg_clean: str) -> None:
    """pg_terminate_backend of the listener: the Bus reconnects and reloads what it missed."""
    b = await make_bus("b")
    old_pid = b.listener_pid
    assert old_pid is not None
    # A change b was never told about: only the reload after reconnecting can bring it.
    await sql(
        pg_clean,
        "INSERT INTO provider_state (provider, health, seq) VALUES ('alpha', 'healthy', 7)",
    )
    await sql(pg_clean, "SELECT pg_terminate_backend($1)", old_pid)

    await eventually(lambda: b.connected and seq_of(b, "alpha") == 7)
    assert b.reconnects == 1
    assert b.listener_pid not in (None, old_pid)


async def test_frozen_listener_is_detected_by_heartbeat(
    make_own_bus: MakeBus, own_pg: tuple[EmbeddedPostgres, str]
) -> None:
    """A listener backend that stops answering (SIGSTOP) fires no event; the heartbeat
    timeout catches it, and the Bus reconnects and reloads the change it missed."""
    a = await make_own_bus("a")
    b = await make_own_bus("b")
    frozen = b.listener_pid
    assert frozen is not None
    os.kill(frozen, signal.SIGSTOP)
    try:
        row = await a.publish("alpha", breaker="open", reason="r", source="web-1", open_for=60)
        assert row is not None
        await eventually(lambda: b.reconnects == 1 and b.connected and seq_of(b, "alpha") == 1)
        assert b.heartbeat_failures >= 1
    finally:
        os.kill(frozen, signal.SIGCONT)


async def test_postgres_restart(
    make_own_bus: MakeBus, own_pg: tuple[EmbeddedPostgres, str]
) -> None:
    """Postgres down: publish returns None, a new Bus starts anyway; back up: all reconnect
    and state flows again."""
    cluster, _ = own_pg
    a = await make_own_bus("a")
    b = await make_own_bus("b")
    assert await a.publish("alpha", health="healthy", reason="ok", source="healthd")
    await eventually(lambda: seq_of(b, "alpha") == 1)

    await asyncio.to_thread(cluster.stop)
    await eventually(lambda: not a.connected and not b.connected)
    assert await a.publish("alpha", health="unhealthy", reason="down", source="healthd") is None
    late = await make_own_bus("late")  # must not raise
    assert not late.connected
    assert b.view.rows["alpha"].health is Health.HEALTHY  # serving on the last view

    await asyncio.to_thread(cluster.start)
    await eventually(lambda: a.connected and b.connected and late.connected)
    row = await a.publish("alpha", health="degraded", reason="back", source="healthd")
    assert row is not None and row.seq == 2
    await eventually(lambda: all(seq_of(bus, "alpha") == 2 for bus in (a, b, late)))
    assert b.reconnects >= 1


async def test_subscriber_error_does_not_stop_the_bus(make_bus: MakeBus) -> None:
    """A subscriber that raises makes the Bus resynchronise, not die; later changes flow."""
    a = await make_bus("a")
    b = await make_bus("b")
    calls: list[int] = []

    def flaky(row: StateRow) -> None:
        calls.append(row.seq)
        if len(calls) == 1:
            raise RuntimeError("subscriber bug")

    b.view.subscribe(flaky)
    assert await a.publish("alpha", health="healthy", reason="ok", source="healthd")
    await eventually(lambda: b.reconnects == 1 and b.connected)
    assert await a.publish("alpha", health="degraded", reason="slow", source="healthd")
    await eventually(lambda: seq_of(b, "alpha") == 2)
    assert calls[-1] == 2


async def test_heartbeat_reports_healthd_age(make_bus: MakeBus, pg_clean: str) -> None:
    """The heartbeat query turns healthd_heartbeat.beat_at into view.healthd_age() (db clock)."""
    b = await make_bus("b")
    await eventually(lambda: b.heartbeats >= 1)
    assert b.view.healthd_age() is None  # no healthd has ever beaten

    await sql(
        pg_clean,
        "INSERT INTO healthd_heartbeat (id, holder, started_at, beat_at)"
        " VALUES (1, 'healthd-1', now() - interval '1 hour', now() - interval '5 minutes')",
    )
    await eventually(lambda: b.view.healthd_age() is not None)
    age = b.view.healthd_age()
    assert age is not None and 300 <= age < 360


async def test_prune_deletes_only_old_rows(pg_clean: str) -> None:
    """Retention removes history older than keep_days and keeps the rest."""
    conn = await asyncpg.connect(pg_clean)
    try:
        for age in ("10 days", "1 day"):
            await conn.execute(
                f"INSERT INTO breaker_events (provider, to_state, reason, source, at)"
                f" VALUES ('alpha', 'open', '{age}', 'test', now() - interval '{age}')"
            )
            await conn.execute(
                f"INSERT INTO health_samples (provider, ok, error_class, at)"
                f" VALUES ('alpha', true, '{age}', now() - interval '{age}')"
            )
            await conn.execute(
                f"INSERT INTO service_errors (error_class, detail, at)"
                f" VALUES ('timeout', '{age}', now() - interval '{age}')"
            )
        deleted = await prune(conn, keep_days=7)
        assert deleted == {"breaker_events": 1, "health_samples": 1, "service_errors": 1,
                           "fallback_events": 0, "feedback": 0}
        assert await conn.fetchval("SELECT array_agg(reason) FROM breaker_events") == ["1 day"]
        assert await conn.fetchval("SELECT array_agg(error_class) FROM health_samples") == ["1 day"]
        assert await conn.fetchval("SELECT array_agg(detail) FROM service_errors") == ["1 day"]
    finally:
        await conn.close()


async def test_history_and_config_writes(make_bus: MakeBus, pg_clean: str) -> None:
    """Samples and errors are inserted in batches; the providers table mirrors the config."""
    a = await make_bus("a")
    assert await a.record_samples(
        [
            HealthSample(provider="alpha", ok=True, latency_ms=12.5, ttft_ms=80.0),
            HealthSample(provider="beta", ok=False, error_class="timeout", status=None),
        ]
    )
    assert await a.record_errors(
        [ServiceError(error_class="upstream_5xx", provider="beta", status=503)]
    )
    assert await a.record_error(
        error_class="timeout", request_id="req-1", model="default", detail="x"
    )
    samples = await sql(
        pg_clean, "SELECT provider, ok, latency_ms, error_class FROM health_samples ORDER BY id"
    )
    assert [tuple(s) for s in samples] == [
        ("alpha", True, 12.5, None),
        ("beta", False, None, "timeout"),
    ]
    errors = await sql(
        pg_clean, "SELECT error_class, provider, request_id, status FROM service_errors ORDER BY id"
    )
    assert [tuple(e) for e in errors] == [
        ("upstream_5xx", "beta", None, 503),
        ("timeout", None, "req-1", None),
    ]

    settings = Settings()
    p1 = resolve(
        ProviderConfig(
            name="alpha",
            kind="openai",
            base_url="http://a/v1",
            api_key_env="ALPHA_KEY",
            priority=1,
            models={"default": "gpt-4o-mini"},
        ),
        settings,
    )
    p2 = resolve(ProviderConfig(name="beta", kind="sim", models={"default": "sim-1"}), settings)
    assert await a.upsert_providers([p1, p2])
    assert await a.upsert_providers([p1])
    rows = await sql(
        pg_clean, "SELECT name, kind, base_url, priority, weight, models::text FROM providers"
    )
    assert [tuple(r) for r in rows] == [
        ("alpha", "openai", "http://a/v1", 1, 1.0, '{"default": "gpt-4o-mini"}')
    ]


async def test_publish_rejects_unknown_health(make_bus: MakeBus) -> None:
    """A health value outside the Health enum is a caller bug and raises, unlike an outage."""
    a = await make_bus("a")
    with pytest.raises(ValueError):
        await a.publish("alpha", health="fine", reason="r", source="s")


def test_retention_days_from_env() -> None:
    """BULWARK_RETENTION_DAYS sets the retention; unset means 7 days; nonsense is refused."""
    assert retention_days({}) == 7.0
    assert retention_days({"BULWARK_RETENTION_DAYS": "1.5"}) == 1.5
    for bad in ("soon", "0", "-1"):
        with pytest.raises(ValueError):
            retention_days({"BULWARK_RETENTION_DAYS": bad})
