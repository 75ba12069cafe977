"""`python -m healthd` as real processes, against real simulators and a real Postgres."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import pytest

from bulwark.bus import Bus
from bulwark.state import View
from healthd.leader import LOCK_KEY
from tests.conftest import SimFactory
from tests.procs import (
    Daemon,
    Spawn,
    heal,
    health_is,
    holder,
    state_of,
    until,
    write_providers,
)

pytestmark = pytest.mark.slow


async def test_failing_provider_goes_unhealthy_and_recovers(
    sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection, tmp_path: Path,
) -> None:
    """A provider whose probes fail is published unhealthy, and healthy again once it heals;
    samples, the config snapshot (without secrets) and the heartbeat are written."""
    alpha, beta = await sim("alpha"), await sim("beta")
    secret = "alpha-key-must-never-leak-0123"
    daemon = await spawn(pg_clean, write_providers(tmp_path / "p.toml", [alpha, beta]),
                         ALPHA_KEY=secret)
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    await until(health_is(db, "beta", "healthy"), what="beta healthy")

    await alpha.script(models_status=503)
    row = await until(health_is(db, "alpha", "unhealthy"), what="alpha unhealthy")
    assert "server_error" in row["reason"]
    assert row["updated_by"] == "healthd"
    beta_row = await state_of(db, "beta")
    assert beta_row is not None
    assert beta_row["health"] == "healthy"

    await heal(alpha)
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy again")

    samples = await db.fetchval(
        "select count(*) from health_samples where provider = 'alpha' and not ok")
    await until(lambda: db.fetchval("select count(*) from health_samples where ok"),
                what="good samples stored")
    assert samples >= 2
    assert await holder(db) == holder_name(daemon)
    snapshot = await db.fetch("select * from providers order by name")
    assert [r["name"] for r in snapshot] == ["alpha", "beta"]
    assert secret not in str([dict(r) for r in snapshot])

    assert await daemon.stop() == 0
    output = daemon.output()
    assert secret not in output
    assert '"provider":"alpha","transition":"degraded->unhealthy"' in output


async def test_standby_takes_over_when_the_leader_is_killed(
    sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection, tmp_path: Path,
) -> None:
    """Of two daemons only one holds the lock and beats; kill -9 it and the standby takes
    over (the heartbeat holder changes) and keeps publishing."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    first, second = await spawn(pg_clean, providers), await spawn(pg_clean, providers)
    names = {holder_name(d): d for d in (first, second)}
    leader_name = await until(lambda: holder(db), what="a heartbeat")
    assert leader_name in names
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    # Both are campaigning (the standby keeps its lock connection open between tries).
    await until(lambda: lock_sessions(db, 2), what="both daemons connected")
    assert await db.fetchval(LOCK_HOLDERS_SQL, LOCK_KEY) == 1
    assert await holder(db) == leader_name

    leader = names.pop(leader_name)
    [(standby_name, standby)] = names.items()
    leader.proc.kill()
    await leader.proc.wait()
    await until(lambda: holder_matches(db, standby_name), what="the standby took over")
    await alpha.script(models_status=503)
    await until(health_is(db, "alpha", "unhealthy"), what="the new leader publishes")
    assert await standby.stop() == 0


async def test_frozen_leader_is_fenced_and_the_standby_takes_over(
    sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection, tmp_path: Path,
) -> None:
    """A leader frozen with SIGSTOP (no socket closes) loses its lock session to Postgres's
    idle timeout; the standby takes over, and the old leader, thawed, stands by."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    first, second = await spawn(pg_clean, providers), await spawn(pg_clean, providers)
    names = {holder_name(d): d for d in (first, second)}
    leader_name = await until(lambda: holder(db), what="a heartbeat")
    await until(lambda: lock_sessions(db, 2), what="both daemons connected")
    leader = names.pop(leader_name)
    [(standby_name, _)] = names.items()
    leader.proc.send_signal(signal.SIGSTOP)
    try:
        await until(lambda: holder_matches(db, standby_name), what="the standby took over")
    finally:
        leader.proc.send_signal(signal.SIGCONT)

    async def stood_down() -> bool:
        return "stepped down" in leader.output()

    await until(stood_down, what="the thawed leader stepping down")
    await until(lambda: lock_sessions(db, 2), what="the old leader campaigning again")
    assert await db.fetchval(LOCK_HOLDERS_SQL, LOCK_KEY) == 1
    assert await holder(db) == standby_name


async def test_leader_whose_lock_connection_dies_steps_down_and_comes_back(
    sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection, tmp_path: Path,
) -> None:
    """Killing the leader's lock session (as a Postgres restart would) makes it step down,
    not exit; with no rival it takes the lock again and goes on publishing."""
    alpha = await sim("alpha")
    daemon = await spawn(pg_clean, write_providers(tmp_path / "p.toml", [alpha]))
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    killed = await db.fetchval(
        "select pg_terminate_backend(pid) from pg_stat_activity"
        " where application_name like 'healthd %'")
    assert killed

    async def new_term() -> bool:
        return '"term":2' in daemon.output()

    await until(new_term, what="a second term")
    await alpha.script(models_status=503)
    await until(health_is(db, "alpha", "unhealthy"), what="alpha unhealthy")
    assert daemon.proc.returncode is None
    assert await daemon.stop() == 0


async def test_breaker_recovery_is_driven_by_probes(
    sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection, tmp_path: Path,
) -> None:
    """Breakers a web process opened go half-open when their period ends; probe successes
    close one, a failed probe reopens the other for longer."""
    alpha, beta = await sim("alpha"), await sim("beta")
    await beta.script(models_status=503)
    daemon = await spawn(pg_clean, write_providers(tmp_path / "p.toml", [alpha, beta]))
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    await until(health_is(db, "beta", "unhealthy"), what="beta unhealthy")
    web = Bus(pg_clean, View(), name="web-test")
    await web.start()
    try:
        for name in ("alpha", "beta"):
            row = await web.publish(name, breaker="open", reason="5 consecutive failures",
                                    source="web:test", open_for=0.5)
            assert row is not None
        await until(lambda: breaker_is(db, "alpha", "closed", after="half_open"),
                    what="alpha closed by probes")
        events = await until(lambda: events_of(db, "beta", 3), what="beta reopened")
    finally:
        await web.close()
    assert [(e["from_state"], e["to_state"], e["source"]) for e in events] == [
        ("closed", "open", "web:test"),
        ("open", "half_open", "healthd"),
        ("half_open", "open", "healthd"),
    ]
    assert "server_error" in events[2]["reason"]
    # The reopened period grew past the web's 0.5 s (CB_RESET_SEC=1, doubled per trip).
    open_for = await db.fetchval(
        "select extract(epoch from open_until - updated_at) from provider_state"
        " where provider = 'beta'")
    assert open_for > 0.5
    assert await daemon.stop() == 0


async def test_waits_for_postgres_instead_of_exiting(spawn: Spawn, tmp_path: Path,
                                                     sim: SimFactory) -> None:
    """With Postgres unreachable healthd logs it and keeps trying; SIGTERM still exits 0."""
    alpha = await sim("alpha")
    daemon = await spawn("postgresql://bulwark@127.0.0.1:9/bulwark",
                         write_providers(tmp_path / "p.toml", [alpha]))

    async def complained() -> bool:
        return "cannot reach Postgres" in daemon.output()

    await until(complained, what="a log line about Postgres")
    assert daemon.proc.returncode is None
    assert await daemon.stop(signal.SIGINT) == 0


async def test_missing_database_url_is_a_config_error(spawn: Spawn, tmp_path: Path,
                                                      sim: SimFactory) -> None:
    """Without DATABASE_URL healthd exits 2 and says why."""
    alpha = await sim("alpha")
    daemon = await spawn(None, write_providers(tmp_path / "p.toml", [alpha]))
    assert await asyncio.wait_for(daemon.proc.wait(), 20) == 2
    assert "DATABASE_URL is not set" in daemon.output()


# -- helpers ----------------------------------------------------------------------------------

#: Sessions holding healthd's advisory lock (a bigint key is split over classid/objid).
LOCK_HOLDERS_SQL = """
select count(*) from pg_locks
where locktype = 'advisory' and granted and objsubid = 1
  and ((classid::bigint << 32) | objid::bigint) = $1
"""


def holder_name(daemon: Daemon) -> str:
    return f"{os.uname().nodename}:{daemon.pid}"


async def holder_matches(db: asyncpg.Connection, name: str) -> bool:
    return await holder(db) == name


async def lock_sessions(db: asyncpg.Connection, count: int) -> bool:
    found = await db.fetchval(
        "select count(*) from pg_stat_activity where application_name like 'healthd %'")
    return bool(found == count)


async def breaker_is(db: asyncpg.Connection, provider: str, state: str, *,
                     after: str) -> bool:
    row = await db.fetchrow(
        "select to_state, from_state from breaker_events where provider = $1"
        " order by id desc limit 1", provider)
    return row is not None and (row["from_state"], row["to_state"]) == (after, state)


async def events_of(db: asyncpg.Connection, provider: str,
                    count: int) -> list[asyncpg.Record] | None:
    rows = await db.fetch(
        "select * from breaker_events where provider = $1 order by id limit $2",
        provider, count)
    return rows if len(rows) == count else None
