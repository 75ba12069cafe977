"""Durable chat jobs in Postgres: every statement on `chat_jobs`, `webhook_deliveries` and
`idempotency_keys`, shared by the web processes (routes, worker), healthd (DLQ replay,
retention) and the admin API.

A job's life (schema/migrations/0004_jobs.sql has the columns)::

    queued ──claim──▶ running ──▶ succeeded | failed | dead
      ▲  │                │  └─ retryable failure: queued again after a backoff
      │  └─▶ cancelled    └──── lease expired (process died) or returned (SIGTERM)
      └──── dead, replayed by healthd's leader (or an operator)

Claims use `FOR UPDATE SKIP LOCKED`, so any number of processes take distinct jobs without
waiting on each other, and a lease (`lease_until`, renewed while the job runs): a process
killed mid-job simply stops renewing it and another process takes the job. Every write
that makes a job runnable NOTIFYs `chat_jobs` in the same statement, so workers wake at
once; a slow poll covers expired leases and backoffs.

Functions take anything with asyncpg's query methods (a Connection, a pool connection, or
a Pool, which acquires per call) and raise asyncpg's errors: callers decide what an
unreachable database means for them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any, Final, Literal, Protocol

import asyncpg
import msgspec

from bulwark.bus import CONNECTION_ERRORS

#: What a statement can fail with that is the database's trouble, not a bug of ours.
DB_ERRORS: Final[tuple[type[Exception], ...]] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
#: The NOTIFY channel that wakes job workers (payload unused).
CHANNEL: Final = "chat_jobs"
#: An Idempotency-Key is honoured this long (CONTRACT: 24 hours).
IDEMPOTENCY_TTL_SEC: Final = 86_400.0

Status = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]
FINAL: Final = ("succeeded", "failed", "dead")


class Conn(Protocol):
    async def fetch(self, query: str, *args: object,
                    timeout: float | None = ...) -> list[asyncpg.Record]: ...
    async def fetchrow(self, query: str, *args: object,
                       timeout: float | None = ...) -> asyncpg.Record | None: ...
    async def fetchval(self, query: str, *args: object, column: int = ...,
                       timeout: float | None = ...) -> Any: ...
    async def execute(self, query: str, *args: object, timeout: float | None = ...) -> str: ...


class JobsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Jobs, DLQ and webhook settings (docs/CONFIGURATION.md, "Jobs")."""

    #: Jobs one web process runs at once: jobs are background work, and live requests
    #: must keep the process's CPU and the providers' capacity.
    concurrency: int = 4
    #: A running job's lease; renewed every third of it, so a dead process's jobs are
    #: taken over within about this long.
    lease_sec: float = 30.0
    #: The slow poll that finds expired leases and jobs whose backoff ended (NOTIFY wakes
    #: workers for everything else).
    poll_sec: float = 2.0
    #: A job is dead once it has made this many attempts, or is older than max_age_sec.
    max_attempts: int = 8
    max_age_sec: float = 3600.0
    #: Backoff between a job's attempts: base * 2**(n-1), capped, with jitter.
    backoff_base_sec: float = 2.0
    backoff_max_sec: float = 300.0
    #: healthd prunes succeeded, failed and cancelled jobs (and delivery records) older
    #: than this; dead jobs stay until replayed or purged.
    retention_days: float = 7.0
    #: DLQ replay pace, jobs per second, fleet-wide.
    replay_per_sec: float = 10.0
    metadata_max_bytes: int = 16_384
    #: Connections of the web process's pool for jobs and idempotency keys.
    db_pool_size: int = 8
    webhook_attempts: int = 5
    webhook_backoff_sec: float = 1.0
    webhook_timeout_sec: float = 10.0


_ENV: Final = {
    "BULWARK_JOBS_CONCURRENCY": "concurrency",
    "BULWARK_JOBS_LEASE_SEC": "lease_sec",
    "BULWARK_JOBS_POLL_SEC": "poll_sec",
    "BULWARK_JOBS_MAX_ATTEMPTS": "max_attempts",
    "BULWARK_JOBS_MAX_AGE_SEC": "max_age_sec",
    "BULWARK_JOBS_BACKOFF_BASE_SEC": "backoff_base_sec",
    "BULWARK_JOBS_BACKOFF_MAX_SEC": "backoff_max_sec",
    "BULWARK_JOBS_RETENTION_DAYS": "retention_days",
    "BULWARK_DLQ_REPLAY_PER_SEC": "replay_per_sec",
    "BULWARK_JOBS_METADATA_MAX_BYTES": "metadata_max_bytes",
    "BULWARK_JOBS_DB_POOL": "db_pool_size",
    "BULWARK_WEBHOOK_ATTEMPTS": "webhook_attempts",
    "BULWARK_WEBHOOK_BACKOFF_SEC": "webhook_backoff_sec",
    "BULWARK_WEBHOOK_TIMEOUT_SEC": "webhook_timeout_sec",
}
_POSITIVE: Final = frozenset(_ENV.values())


def jobs_config(env: Mapping[str, str] | None = None) -> JobsConfig:
    """JobsConfig from the environment; ValueError naming the variable when one is bad."""
    env = os.environ if env is None else env
    raw = {field: env[var] for var, field in _ENV.items() if env.get(var, "").strip()}
    try:
        cfg = msgspec.convert(raw, JobsConfig, strict=False)
    except msgspec.ValidationError as err:
        raise ValueError(f"invalid jobs setting: {err}") from None
    for var, field in _ENV.items():
        if field in _POSITIVE and not getattr(cfg, field) > 0:
            raise ValueError(f"{var} must be positive")
    return cfg


def new_job_id() -> str:
    # 96 random bits: unguessable (the id is the only key to a job's answer) and unique.
    return "job_" + secrets.token_hex(12)


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed job, as a worker needs it."""

    id: str
    model: str
    request: bytes
    attempts: int
    age_sec: float
    callback_url: str | None


_FIELDS_TEMPLATE: Final = """
    {t}id, {t}status, {t}model, {t}attempts, {t}provider, {t}replays, {t}callback_url,
    {t}request_id, {t}result::text AS result, {t}error::text AS error,
    {t}metadata::text AS metadata,
    extract(epoch FROM {t}created_at)::float8 AS created_at,
    extract(epoch FROM {t}updated_at)::float8 AS updated_at
"""
_JOB_FIELDS: Final = _FIELDS_TEMPLATE.format(t="")
#: The same, for statements that join another relation with an `id`.
_JOB_FIELDS_J: Final = _FIELDS_TEMPLATE.format(t="j.")

# An id collision is impossible in practice; ON CONFLICT makes a retried insert (the
# connection died after the commit, before the reply) find its own row instead of failing.
_INSERT: Final = f"""
WITH j AS (
    INSERT INTO chat_jobs (id, model, request, callback_url, metadata, request_id)
    VALUES ($1::text, $2::text, $3::text::jsonb, $4::text, $5::text::jsonb, $6::text)
    ON CONFLICT (id) DO NOTHING
    RETURNING {_JOB_FIELDS}
)
SELECT j.*, pg_notify('{CHANNEL}', j.model) FROM j
"""  # noqa: S608 - constants only

_GET: Final = f"SELECT {_JOB_FIELDS} FROM chat_jobs WHERE id = $1"  # noqa: S608


async def insert_job(conn: Conn, *, job_id: str, model: str, request: bytes,
                     callback_url: str | None, metadata: bytes | None,
                     request_id: str) -> asyncpg.Record:
    """Store a queued job and wake the workers; returns the job's row once committed."""
    rec = await conn.fetchrow(_INSERT, job_id, model, request.decode(), callback_url,
                              None if metadata is None else metadata.decode(), request_id)
    if rec is None:
        rec = await conn.fetchrow(_GET, job_id)
        assert rec is not None, "a conflicting id must exist"
    return rec


async def get_job(conn: Conn, job_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_GET, job_id)


_CANCEL: Final = f"""
WITH c AS (
    UPDATE chat_jobs SET status = 'cancelled', updated_at = now(), finished_at = now()
    WHERE id = $1 AND status = 'queued'
    RETURNING {_JOB_FIELDS}
)
SELECT true AS cancelled, c.* FROM c
UNION ALL
SELECT false, {_JOB_FIELDS} FROM chat_jobs
WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM c)
"""  # noqa: S608


async def cancel_job(conn: Conn, job_id: str) -> tuple[bool, asyncpg.Record | None]:
    """(cancelled now, the job as it is after); (False, None) for an unknown id."""
    rec = await conn.fetchrow(_CANCEL, job_id)
    if rec is None:
        return False, None
    return bool(rec["cancelled"]), rec


# Due queued jobs of models that can be answered now (or past their age limit: they are
# claimed to be declared dead), and running jobs whose lease expired (their process died).
_CLAIM: Final = """
WITH picked AS (
    SELECT id FROM chat_jobs
    WHERE (status = 'queued' AND not_before <= now()
           AND (model = ANY($3::text[]) OR age_from < now() - make_interval(secs => $4)))
       OR (status = 'running' AND lease_until < now() AND NOT id = ANY($6::text[]))
    ORDER BY not_before
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE chat_jobs j SET
    status = 'running', attempts = j.attempts + 1, leased_by = $1::text,
    lease_until = now() + make_interval(secs => $5), updated_at = now()
FROM picked WHERE j.id = picked.id
RETURNING j.id, j.model, j.request::text AS request, j.attempts, j.callback_url,
    extract(epoch FROM now() - j.age_from)::float8 AS age_sec
"""


async def claim(conn: Conn, *, worker: str, limit: int, models: list[str],
                max_age_sec: float, lease_sec: float, running: list[str]) -> list[Job]:
    """Take up to `limit` runnable jobs for `worker`; each claim counts one attempt.
    `running`: the worker's own jobs, whose leases may have expired while Postgres was
    away — they are still running here, not abandoned."""
    rows = await conn.fetch(_CLAIM, worker, limit, models, max_age_sec, lease_sec, running)
    return [Job(id=r["id"], model=r["model"], request=r["request"].encode(),
                attempts=r["attempts"], age_sec=r["age_sec"], callback_url=r["callback_url"])
            for r in rows]


_RENEW: Final = """
UPDATE chat_jobs SET lease_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::text[]) AND leased_by = $2 AND status = 'running'
"""


async def renew(conn: Conn, *, worker: str, ids: list[str], lease_sec: float) -> int:
    status = await conn.execute(_RENEW, ids, worker, lease_sec)
    return int(status.rsplit(" ", 1)[-1])


# The outcome of one attempt, only if the lease is still ours (else another process has
# the job now, and its outcome counts). A final job with a callback gets its webhook
# pending, leased to us for hook_lease seconds (we deliver it right away).
_FINISH: Final = f"""
WITH f AS (
    UPDATE chat_jobs SET
        status = $3::text,
        result = $4::text::jsonb,
        error = $5::text::jsonb,
        provider = coalesce($6::text, provider),
        attempts = greatest(attempts + $8::int, 0),
        not_before = now() + make_interval(secs => $7),
        lease_until = NULL, leased_by = NULL, updated_at = now(),
        finished_at = CASE WHEN $3::text IN ('succeeded', 'failed', 'dead') THEN now() END,
        dead_at = CASE WHEN $3::text = 'dead' THEN now() END,
        hook_state = CASE WHEN callback_url IS NOT NULL
                          AND $3::text IN ('succeeded', 'failed', 'dead') THEN 'pending' END,
        hook_lease_until = CASE WHEN callback_url IS NOT NULL
                          AND $3::text IN ('succeeded', 'failed', 'dead')
                          THEN now() + make_interval(secs => $9) END
    WHERE id = $1 AND leased_by = $2 AND status = 'running'
    RETURNING {_JOB_FIELDS}
)
SELECT f.*, CASE WHEN f.status = 'queued' THEN pg_notify('{CHANNEL}', f.model) END FROM f
"""  # noqa: S608


async def finish(conn: Conn, job_id: str, *, worker: str, status: Status,
                 result: bytes | None = None, error: bytes | None = None,
                 provider: str | None = None, delay_sec: float = 0.0,
                 attempts_delta: int = 0, hook_lease_sec: float = 60.0) -> asyncpg.Record | None:
    """Record an attempt's outcome; None when the lease was no longer ours."""
    return await conn.fetchrow(
        _FINISH, job_id, worker, status, None if result is None else result.decode(),
        None if error is None else error.decode(), provider, delay_sec, attempts_delta,
        hook_lease_sec)


_RELEASE: Final = f"""
WITH r AS (
    UPDATE chat_jobs SET status = 'queued', attempts = greatest(attempts - 1, 0),
        lease_until = NULL, leased_by = NULL, not_before = now(), updated_at = now()
    WHERE id = ANY($1::text[]) AND leased_by = $2 AND status = 'running'
    RETURNING model
)
SELECT count(*) AS n, max(pg_notify('{CHANNEL}', r.model)::text) FROM r
"""  # noqa: S608


async def release(conn: Conn, *, worker: str, ids: list[str]) -> int:
    """Give leases back (shutdown): the jobs are queued again, the interrupted attempt not
    counted, and other processes are woken to take them now."""
    return int(await conn.fetchval(_RELEASE, ids, worker))


# -- the dead-letter queue ------------------------------------------------------------------

_COUNTS: Final = """
SELECT
    (SELECT count(*) FROM chat_jobs WHERE status = 'dead') AS dead,
    (SELECT count(*) FROM chat_jobs WHERE status = 'queued') AS queued,
    (SELECT count(*) FROM chat_jobs WHERE status = 'running') AS running,
    (SELECT extract(epoch FROM now() - min(dead_at))::float8
       FROM chat_jobs WHERE status = 'dead') AS oldest_dead_age_sec
"""


async def dlq_counts(conn: Conn) -> dict[str, Any]:
    """`GET /health/dlq`: {"dead", "queued", "running", "oldest_dead_age_sec"}."""
    rec = await conn.fetchrow(_COUNTS)
    assert rec is not None
    oldest = rec["oldest_dead_age_sec"]
    return {"dead": rec["dead"], "queued": rec["queued"], "running": rec["running"],
            "oldest_dead_age_sec": None if oldest is None else round(float(oldest), 3)}


_LIST_DEAD: Final = f"""
SELECT {_JOB_FIELDS}, extract(epoch FROM dead_at)::float8 AS dead_at
FROM chat_jobs WHERE status = 'dead' AND ($2::text IS NULL OR model = $2::text)
ORDER BY dead_at LIMIT $1
"""  # noqa: S608


async def list_dead(conn: Conn, limit: int, model: str | None = None) -> list[dict[str, Any]]:
    """Dead jobs, oldest first, as job objects (plus `dead_at`), for the admin API."""
    rows = await conn.fetch(_LIST_DEAD, limit, model)
    return [{**job_object(r), "dead_at": r["dead_at"]} for r in rows]


_REQUEUE: Final = f"""
WITH r AS (
    UPDATE chat_jobs SET status = 'queued', attempts = 0, replays = replays + 1,
        error = NULL, not_before = now(), age_from = now(), updated_at = now(),
        finished_at = NULL, dead_at = NULL, hook_state = NULL, hook_lease_until = NULL
    WHERE id = $1 AND status = 'dead'
    RETURNING model
)
SELECT pg_notify('{CHANNEL}', r.model) FROM r
"""  # noqa: S608


async def retry_dead(conn: Conn, job_id: str) -> bool:
    """Put one dead job back in the queue (attempts and age reset); False if it is not
    dead (unknown, or replayed meanwhile)."""
    return await conn.fetchrow(_REQUEUE, job_id) is not None


_PURGE: Final = """
DELETE FROM chat_jobs WHERE status = 'dead'
    AND ($1::text IS NULL OR model = $1::text)
    AND ($2::float8 IS NULL OR dead_at < now() - make_interval(secs => $2::float8))
"""


async def purge_dead(conn: Conn, *, model: str | None = None,
                     older_than_sec: float | None = None) -> int:
    """Delete dead jobs (of one model, dead for longer than older_than_sec); the count."""
    status = await conn.execute(_PURGE, model, older_than_sec)
    return int(status.rsplit(" ", 1)[-1])


# Oldest first, only those that died before the model recovered: a job that dies again
# after this recovery waits for the next one instead of cycling through replays. And only
# as many as leave at most `limit` replayed jobs not yet claimed (attempts still 0): if
# workers cannot take them now, they must not pile up and then go upstream all at once.
_REPLAY: Final = f"""
WITH backlog AS (
    SELECT count(*) AS n FROM chat_jobs
    WHERE status = 'queued' AND model = $1 AND replays > 0 AND attempts = 0
), picked AS (
    SELECT id FROM chat_jobs
    WHERE status = 'dead' AND model = $1 AND dead_at < $2
    ORDER BY dead_at LIMIT greatest(0, $3 - (SELECT n FROM backlog))
    FOR UPDATE SKIP LOCKED
), r AS (
    UPDATE chat_jobs j SET status = 'queued', attempts = 0, replays = j.replays + 1,
        error = NULL, not_before = now(), age_from = now(), updated_at = now(),
        finished_at = NULL, dead_at = NULL, hook_state = NULL, hook_lease_until = NULL
    FROM picked WHERE j.id = picked.id
    RETURNING j.id
)
SELECT coalesce(array_agg(r.id), '{{}}') AS ids,
    CASE WHEN count(*) > 0 THEN pg_notify('{CHANNEL}', $1) END
FROM r
"""  # noqa: S608


async def replay_dead(conn: Conn, *, model: str, died_before: Any, limit: int) -> list[str]:
    """Requeue up to `limit` of a model's dead jobs that died before `died_before` (a
    timestamptz from the database's clock); the ids requeued."""
    return list(await conn.fetchval(_REPLAY, model, died_before, limit))


_CLAIMED_AGO: Final = """
SELECT CASE WHEN bool_and(status <> 'queued')
            THEN extract(epoch FROM now() - max(updated_at))::float8 END
FROM chat_jobs WHERE id = ANY($1::text[])
"""


async def claimed_ago(conn: Conn, ids: list[str]) -> float | None:
    """Seconds since the last of these jobs was claimed (or finished, which is later), or
    None while one is still queued. Database clock only."""
    value = await conn.fetchval(_CLAIMED_AGO, ids)
    return None if value is None else float(value)


async def prune(conn: Conn, *, keep_days: float) -> dict[str, int]:
    """Retention: finished jobs (not dead ones: the DLQ is pruned only by purge_dead) and
    delivery records older than keep_days; idempotency keys past their 24 hours."""
    keep = keep_days * 86_400
    out: dict[str, int] = {}
    for name, sql, arg in (
        ("chat_jobs", "DELETE FROM chat_jobs WHERE status IN ('succeeded', 'failed', "
         "'cancelled') AND finished_at < now() - make_interval(secs => $1)", keep),
        ("webhook_deliveries",
         "DELETE FROM webhook_deliveries WHERE at < now() - make_interval(secs => $1)", keep),
        ("idempotency_keys", "DELETE FROM idempotency_keys "
         "WHERE created_at < now() - make_interval(secs => $1)", IDEMPOTENCY_TTL_SEC),
    ):
        status = await conn.execute(sql, arg)
        out[name] = int(status.rsplit(" ", 1)[-1])
    return out


# -- webhooks -------------------------------------------------------------------------------

_CLAIM_HOOKS: Final = f"""
WITH picked AS (
    SELECT id FROM chat_jobs
    WHERE hook_state = 'pending' AND hook_lease_until < now()
    ORDER BY hook_lease_until LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE chat_jobs j SET hook_lease_until = now() + make_interval(secs => $2)
FROM picked WHERE j.id = picked.id
RETURNING {_JOB_FIELDS_J}
"""  # noqa: S608


async def claim_hooks(conn: Conn, *, limit: int, lease_sec: float) -> list[asyncpg.Record]:
    """Webhooks whose deliverer died (lease expired): take them over."""
    return await conn.fetch(_CLAIM_HOOKS, limit, lease_sec)


_HOOK_DONE: Final = """
WITH d AS (
    INSERT INTO webhook_deliveries (job_id, webhook_id, attempt, status, error, duration_ms)
    SELECT $1, $2, a, s, e, ms
    FROM unnest($4::int[], $5::int[], $6::text[], $7::float8[]) AS u(a, s, e, ms)
)
UPDATE chat_jobs SET hook_state = $3, hook_lease_until = NULL
WHERE id = $1 AND hook_state = 'pending'
"""


class Delivery(msgspec.Struct, frozen=True):
    attempt: int
    status: int | None
    error: str | None
    duration_ms: float


async def record_delivery(conn: Conn, *, job_id: str, webhook_id: str, delivered: bool,
                          attempts: list[Delivery]) -> None:
    """Every attempt of one delivery, and its outcome on the job."""
    await conn.execute(_HOOK_DONE, job_id, webhook_id, "delivered" if delivered else "failed",
                       [a.attempt for a in attempts], [a.status for a in attempts],
                       [a.error for a in attempts], [a.duration_ms for a in attempts])


# -- the job as clients see it --------------------------------------------------------------

_raw = msgspec.json.Decoder()


def job_object(rec: asyncpg.Record) -> dict[str, Any]:
    """A `chat.job` object (CONTRACT "Durable chat jobs") from a row of _JOB_FIELDS."""
    out: dict[str, Any] = {
        "id": rec["id"], "object": "chat.job", "status": rec["status"],
        "model": rec["model"], "created_at": int(rec["created_at"]),
        "updated_at": int(rec["updated_at"]), "attempts": rec["attempts"],
        "provider": rec["provider"],
    }
    if rec["metadata"] is not None:
        out["metadata"] = _raw.decode(rec["metadata"])
    if rec["result"] is not None:
        out["result"] = _raw.decode(rec["result"])
    if rec["error"] is not None:
        out["error"] = _raw.decode(rec["error"])
    if rec["replays"]:
        out["replays"] = rec["replays"]
    return out
