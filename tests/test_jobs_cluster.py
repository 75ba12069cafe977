"""Jobs across real processes: web × 2 and healthd on one Postgres, simulators on sockets
(issue 6, "Must show": nothing accepted is lost, whatever dies)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bulwark.pgembed import EmbeddedPostgres
from schema.migrate import migrate
from tests.conftest import Sim, SimFactory
from tests.pg import run_sync, throwaway_dir, truncate_state
from tests.procs import Spawn, free_port, heal, health_is, until, write_providers
from tests.test_cluster import Web, start_web

pytestmark = pytest.mark.slow

#: Short leases and polls, so that a takeover happens within the tests' bounds.
JOB_ENV = {"BULWARK_JOBS_LEASE_SEC": "2", "BULWARK_JOBS_POLL_SEC": "0.3",
           "BULWARK_JOBS_BACKOFF_BASE_SEC": "0.1", "BULWARK_JOBS_BACKOFF_MAX_SEC": "0.5",
           "HTTP_BACKOFF_BASE_MS": "0"}


def chat(marker: str) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": marker}]}


async def call(web: Web, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, f"{web.base}{path}",
                                                       **kw) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def job_status(web: Web, job_id: str, *statuses: str):  # type: ignore[no-untyped-def]
    async def probe() -> dict[str, Any] | None:
        status, job, _ = await call(web, "GET", f"/v1/chat/jobs/{job_id}")
        return job if status == 200 and job["status"] in statuses else None
    return probe


async def asked(target: Sim, marker: str) -> int:
    """How many chat requests carrying `marker` the simulator has seen."""
    async with aiohttp.ClientSession() as s, s.get(target.server.make_url("/_sim/log")) as r:
        log = await r.json()
    return sum(1 for e in log if e["path"] == "/v1/chat/completions"
               and marker in str(e["body"]))


async def submit(web: Web, marker: str) -> str:
    status, job, _ = await call(web, "POST", "/v1/chat/jobs", json={"request": chat(marker)})
    assert status == 202, job
    return str(job["id"])


async def test_all_down_prefer_async_then_answer_after_recovery(
        sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """Every provider down: a chat with Prefer: respond-async is a 202 job; once healthd
    sees the provider recover, the job has the answer, and the upstream was asked for it
    exactly once after the recovery (the queued job made no attempt during the outage)."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    await spawn(pg_clean, providers)
    web = await start_web(spawn, pg_clean, providers, free_port(), **JOB_ENV)
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    await alpha.script(then={"status": 503}, include_probes=True)
    await until(health_is(db, "alpha", "unhealthy"), what="alpha unhealthy")
    marker = f"queued-{uuid.uuid4().hex}"
    status, job, headers = await call(web, "POST", "/v1/chat/completions", json=chat(marker),
                                      headers={"Prefer": "respond-async"})
    assert status == 202, job
    assert headers["x-bulwark-fallback"] == "queued"
    assert headers["Preference-Applied"] == "respond-async"
    await heal(alpha)  # also clears the simulator's log and counters
    done = await until(job_status(web, job["id"], "succeeded"), within=30, what="answered")
    assert "alpha" in done["result"]["choices"][0]["message"]["content"]
    assert done["attempts"] == 1
    assert await asked(alpha, marker) == 1


async def test_job_survives_kill9_of_its_web_process_and_of_healthd(
        sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """kill -9 of the web process in the middle of a job (and of healthd): the lease
    expires, the other web process takes the job and answers it."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    healthd = await spawn(pg_clean, providers)
    webs = [await start_web(spawn, pg_clean, providers, free_port(), **JOB_ENV)
            for _ in range(2)]
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    await alpha.script(steps=[{"latency_ms": 60_000}])  # the first answer never comes
    job_id = await submit(webs[0], "survivor")
    running = await until(job_status(webs[0], job_id, "running"), what="running")
    assert running["attempts"] == 1
    holder = await db.fetchval("select leased_by from chat_jobs where id = $1", job_id)
    victim = next(w for w in webs if f":{w.daemon.pid}:" in holder)
    other = next(w for w in webs if w is not victim)
    victim.daemon.proc.kill()
    healthd.proc.kill()
    done = await until(job_status(other, job_id, "succeeded"), within=30, what="taken over")
    assert done["attempts"] == 2
    assert await db.fetchval("select leased_by from chat_jobs where id = $1", job_id) is None
    assert (await alpha.stats())["chat"] == 2


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A private cluster this module may stop and start."""
    data_dir = throwaway_dir("bulwark-jobs-pg-")
    cluster = EmbeddedPostgres(data_dir, throwaway=True)
    try:
        run_sync(migrate(cluster.start()))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def restartable_pg(own_pg: EmbeddedPostgres) -> EmbeddedPostgres:
    await asyncio.to_thread(own_pg.start)
    await truncate_state(own_pg.dsn)
    return own_pg


async def test_jobs_survive_a_postgres_restart(
        sim: SimFactory, spawn: Spawn, restartable_pg: EmbeddedPostgres,
        tmp_path: Path) -> None:
    """Postgres stops while one job runs and another waits, and starts again: the running
    job's answer (arrived meanwhile) is recorded, the waiting one runs; each upstream once."""
    pg = restartable_pg
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    await spawn(pg.dsn, providers)
    web = await start_web(spawn, pg.dsn, providers, free_port(), BULWARK_JOBS_CONCURRENCY="1",
                          **{**JOB_ENV, "BULWARK_JOBS_LEASE_SEC": "30"})
    await alpha.script(steps=[{"latency_ms": 2500}])
    first = await submit(web, "first")
    await until(job_status(web, first, "running"), what="first running")
    second = await submit(web, "second")
    await asyncio.to_thread(pg.stop)
    await until(lambda: _chats(alpha, 1), what="first answered while Postgres is down")
    await asyncio.to_thread(pg.start)
    one = await until(job_status(web, first, "succeeded"), within=30, what="first recorded")
    two = await until(job_status(web, second, "succeeded"), within=30, what="second ran")
    assert (one["attempts"], two["attempts"]) == (1, 1)
    assert await asked(alpha, "first") == 1
    assert await asked(alpha, "second") == 1


async def _chats(target: Sim, n: int) -> bool:
    return (await target.stats())["chat"] >= n


async def test_one_idempotency_key_two_web_processes_one_upstream_call(
        sim: SimFactory, spawn: Spawn, pg_clean: str, tmp_path: Path) -> None:
    """The same Idempotency-Key sent to two web processes costs one upstream call: while
    the first runs, the other process answers 409; afterwards it replays the answer."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    a, b = [await start_web(spawn, pg_clean, providers, free_port(), **JOB_ENV)
            for _ in range(2)]
    await alpha.script(steps=[{"latency_ms": 1500}])
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    first = asyncio.create_task(call(a, "POST", "/v1/chat/completions", json=chat("idem"),
                                     headers=key))
    await until(lambda: _chats(alpha, 1), what="first in flight")
    status, err, headers = await call(b, "POST", "/v1/chat/completions", json=chat("idem"),
                                      headers=key)
    assert (status, err["error"]["code"], headers["Retry-After"]) == (
        409, "idempotency_key_in_use", "1")
    status, answer, _ = await first
    assert status == 200

    async def replay() -> tuple[int, Any, Any] | None:
        got = await call(b, "POST", "/v1/chat/completions", json=chat("idem"), headers=key)
        return got if got[0] != 409 else None
    status, again, headers = await until(replay, what="replayed on the other process")
    assert (status, again, headers["Idempotent-Replayed"]) == (200, answer, "true")
    status, err, _ = await call(b, "POST", "/v1/chat/completions", json=chat("other"),
                                headers=key)
    assert (status, err["error"]["code"]) == (422, "idempotency_key_reused")
    assert (await alpha.stats())["chat"] == 1


PACE = 4


async def test_dead_jobs_are_replayed_once_after_recovery_paced(
        sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """Jobs that died while the provider failed are replayed by healthd once it is healthy
    again: each once, and the upstream sees them at no more than the pace (+1 for a worker
    picking two up together) in any second."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    await spawn(pg_clean, providers, BULWARK_DLQ_REPLAY_PER_SEC=str(PACE))
    # One upstream call per job and too few failures to open the breaker: its closing
    # again would count as a recovery too (and replay the jobs early).
    web = await start_web(spawn, pg_clean, providers, free_port(), CB_FAIL_THRESHOLD="1000",
                          HTTP_RETRIES="0", BULWARK_JOBS_MAX_ATTEMPTS="1", **JOB_ENV)
    await until(health_is(db, "alpha", "healthy"), what="alpha healthy")
    await alpha.script(then={"status": 503})  # chats fail, probes still pass
    ids = [await submit(web, f"dlq-{i}") for i in range(8)]
    for job_id in ids:
        await until(job_status(web, job_id, "dead"), what="dead")

    async def dlq_counts_all() -> bool:
        # /health/dlq may be up to a second old (it is cached, as for the metrics sampler).
        _, counts, _ = await call(web, "GET", "/health/dlq")
        return bool(counts["dead"] == 8)
    await until(dlq_counts_all, what="/health/dlq counts every dead job")
    await alpha.script(then={"status": 503}, include_probes=True)
    await until(health_is(db, "alpha", "unhealthy"), what="outage seen")
    await heal(alpha)
    for job_id in ids:
        job = await until(job_status(web, job_id, "succeeded"), within=30, what="replayed")
        assert (job["replays"], job["attempts"]) == (1, 1)
    async with aiohttp.ClientSession() as s, s.get(alpha.server.make_url("/_sim/log")) as r:
        times = sorted(e["t"] for e in await r.json() if e["path"] == "/v1/chat/completions")
    assert len(times) == 8
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= PACE + 1, times


async def test_sigterm_returns_the_lease(sim: SimFactory, spawn: Spawn, pg_clean: str,
                                         db: asyncpg.Connection, tmp_path: Path) -> None:
    """SIGTERM of the web process running a job: it exits 0 within honcho's grace, and the
    job is queued again at once, its interrupted attempt not counted, no lease held."""
    alpha = await sim("alpha")
    providers = write_providers(tmp_path / "p.toml", [alpha])
    web = await start_web(spawn, pg_clean, providers, free_port(),
                          **{**JOB_ENV, "BULWARK_JOBS_LEASE_SEC": "60"})
    await alpha.script(steps=[{"latency_ms": 60_000}])
    job_id = await submit(web, "interrupted")
    await until(job_status(web, job_id, "running"), what="running")
    web.daemon.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(web.daemon.proc.wait(), 10) == 0
    row = await db.fetchrow("select status, attempts, leased_by, lease_until from chat_jobs "
                            "where id = $1", job_id)
    assert row is not None
    assert (row["status"], row["attempts"], row["leased_by"], row["lease_until"]) == (
        "queued", 0, None, None)
