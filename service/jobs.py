"""Durable chat jobs in the web process: submitting them, and the worker that runs them.

Every web process runs one worker (only with DATABASE_URL). It claims runnable jobs from
Postgres (`bulwark.jobstore.claim`: FOR UPDATE SKIP LOCKED, with a lease it renews while
the job runs), at most `concurrency` at a time, so that jobs never take the process away
from live traffic. It wakes on NOTIFY `chat_jobs` (a job was queued, requeued or replayed),
on a change of provider state (a provider may have recovered), and on a slow poll that
finds expired leases (a process died mid-job) and ended backoffs.

One attempt of a job is one `dispatcher.complete()`: the same failover, retries and
breakers as a live request. Its outcome:
- an answer → `succeeded`;
- the caller's own error (400-class: invalid, context too long for every provider,
  content policy) → `failed`; retrying would fail the same way;
- anything retryable (503, 429, 502, 504, a bug of ours) → `queued` again after a backoff,
  until the attempts are spent by count or by age → `dead`, with the reason, kept in the
  dead-letter queue for healthd to replay when a provider of its model recovers.
Jobs of a model that no provider can answer right now (all open or unhealthy) are not
claimed at all: they wait without spending attempts or upstream calls, and run as soon as
the view says a provider is back.

SIGTERM: the worker stops claiming; at teardown, running jobs are cancelled and their
leases returned (queued again, the interrupted attempt not counted), and other processes
are notified. kill -9: the leases expire and another process takes the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import aiohttp
import asyncpg
import msgspec
from aiohttp import web

from bulwark import jobstore
from bulwark.breaker import State
from bulwark.bus import Bus
from bulwark.config import Settings
from bulwark.errors import GatewayError, ServiceUnavailable
from bulwark.jobstore import DB_ERRORS, Job, JobsConfig
from bulwark.state import Health, StateRow
from bulwark.webhooks import Signer, WebhookSender, signer_from_env, trace_config
from bulwark.wire import ChatRequest, encoder, request_decoder
from service.dispatch import Dispatcher, QueueInstead, Request
from service.idempotency import IdempotencyStore
from service.router import Router
from service.sync import process_name

log = logging.getLogger("bulwark.jobs")

#: A pooled connection that died with a server restart fails once with one of these.
_STALE: Final[tuple[type[Exception], ...]] = (OSError, asyncpg.InterfaceError,
                                              asyncpg.PostgresConnectionError)
_CLOSE_ERRORS: Final[tuple[type[Exception], ...]] = (TimeoutError, *DB_ERRORS)
#: Statements here are single-row and indexed; longer means the database is in trouble,
#: and a route must answer (503) rather than hang.
COMMAND_TIMEOUT_SEC: Final = 5.0
#: How long /health/dlq serves its last count: a dashboard polling every process every
#: second costs one query per process per second at most.
DLQ_CACHE_SEC: Final = 1.0
#: Webhook deliveries one process runs at once (each may wait on a slow receiver).
HOOK_CONCURRENCY: Final = 16
#: Caller errors: what a retry would only repeat. 408 (timeout), 409 and 429 are not.
_CALLER_STATUSES: Final = frozenset({400, 401, 403, 404, 413, 422})


class Outcome(NamedTuple):
    status: jobstore.Status
    result: bytes | None = None
    error: bytes | None = None
    provider: str | None = None
    delay_sec: float = 0.0
    attempts_delta: int = 0


def error_object(err: GatewayError, message: str | None = None) -> bytes:
    body = err.body()["error"]
    assert isinstance(body, dict)
    if message is not None:
        body = {**body, "message": message}
    return encoder.encode(body)


def can_answer(router: Router, model: str) -> bool:
    """Whether some provider of `model` may answer now: in the plan (breaker not open, not
    cooling down after a 429), not half-open (that permit is for probes and live traffic),
    and, while healthd is trusted, not marked unhealthy."""
    trusted = router.shared_health_trusted()
    for rt in router.plan(model).order:
        if rt.breaker.state is State.HALF_OPEN:
            continue
        row = router.view.rows.get(rt.name) if trusted else None
        if row is not None and row.health is Health.UNHEALTHY:
            continue
        return True
    return False


async def _retrying(op: Callable[[], Any]) -> Any:
    """Run a statement; once more on a fresh connection if the pooled one was dead (a
    server restart). Safe: every statement here is idempotent or guarded by its row."""
    try:
        return await op()
    except _STALE:
        return await op()


class Jobs:
    """Jobs in one web process: the pool, submission, the worker, webhook deliveries."""

    def __init__(self, pool: asyncpg.Pool, *, config: JobsConfig, settings: Settings,
                 dispatcher: Dispatcher, router: Router, signer: Signer | None,
                 sender: WebhookSender | None) -> None:
        self.pool = pool
        self.config = config
        self.settings = settings
        self.dispatcher = dispatcher
        self.router = router
        self.signer = signer
        self.sender = sender
        # Unique per start: a restarted process must not mistake its predecessor's leases
        # (same host and pid, in a container) for its own.
        self.name = f"{process_name()}:{secrets.token_hex(3)}"
        # A running claim of a key outlives the longest request by a margin; past that, its
        # process died and the key may be claimed again.
        self.idempotency = IdempotencyStore(pool, lease_sec=settings.request_timeout_sec + 30)
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._hooks: set[asyncio.Task[None]] = set()
        self._hook_slots = asyncio.Semaphore(HOOK_CONCURRENCY)
        self._claiming = True
        self._db_ok = True
        self._dlq: tuple[float, dict[str, Any]] | None = None
        self._dlq_lock = asyncio.Lock()
        # Counters for metrics and tests; monotonic.
        self.claimed = 0
        self.claim_rounds = 0
        self.finished: dict[str, int] = {}
        self.lost_leases = 0
        router.view.subscribe(self._on_provider_row)

    # -- waking ---------------------------------------------------------------------------

    def attach(self, bus: Bus) -> None:
        """LISTEN for new, requeued and replayed jobs (before bus.start())."""
        bus.listen(jobstore.CHANNEL, self._notified, on_resync=self.wake)

    def _notified(self, payload: str) -> None:
        self._wake.set()

    def _on_provider_row(self, row: StateRow) -> None:
        # A provider may have recovered: jobs waiting for its models can run now.
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def hook_lease_sec(self) -> float:
        """Long enough for every retry of one delivery, so that nobody else takes it over
        while we are still trying."""
        c = self.config
        return c.webhook_attempts * (c.webhook_timeout_sec + c.webhook_backoff_sec * 30) + 10

    # -- submitting -------------------------------------------------------------------------

    async def submit(self, chat: ChatRequest, *, callback_url: str | None,
                     metadata: bytes | None, request_id: str) -> asyncpg.Record:
        """Store a job (stream off) and return its row once committed; 503 when Postgres
        cannot take it — a 202 is never given for a job that is not stored."""
        if chat.stream or chat.stream_options is not msgspec.UNSET:
            chat = msgspec.structs.replace(chat, stream=False, stream_options=msgspec.UNSET)
        job_id = jobstore.new_job_id()
        body = encoder.encode(chat)
        try:
            rec = await _retrying(lambda: jobstore.insert_job(
                self.pool, job_id=job_id, model=chat.model, request=body,
                callback_url=callback_url, metadata=metadata, request_id=request_id))
        except DB_ERRORS as err:
            log.warning("cannot store a job: %s", type(err).__name__,
                        extra={"request_id": request_id})
            raise ServiceUnavailable("Jobs cannot be stored right now; retry after the delay "
                                     "given.", code="jobs_unavailable", retry_after=1.0,
                                     should_retry=True) from None
        assert isinstance(rec, asyncpg.Record)
        return rec

    async def db(self, what: str, op: Callable[[], Any]) -> Any:
        """A route's read or write; 503 jobs_unavailable when Postgres cannot answer."""
        try:
            return await _retrying(op)
        except DB_ERRORS as err:
            log.warning("%s failed: %s", what, type(err).__name__)
            raise ServiceUnavailable("The job store is unreachable right now; retry after the "
                                     "delay given.", code="jobs_unavailable", retry_after=1.0,
                                     should_retry=True) from None

    async def dlq(self) -> dict[str, Any]:
        """The DLQ's counts, at most DLQ_CACHE_SEC old."""
        now = time.monotonic()
        if self._dlq is not None and now - self._dlq[0] < DLQ_CACHE_SEC:
            return self._dlq[1]
        async with self._dlq_lock:
            if self._dlq is not None and time.monotonic() - self._dlq[0] < DLQ_CACHE_SEC:
                return self._dlq[1]
            counts = await self.db("dlq counts", lambda: jobstore.dlq_counts(self.pool))
            assert isinstance(counts, dict)
            self._dlq = (time.monotonic(), counts)
            return counts

    # -- the worker -------------------------------------------------------------------------

    async def run(self) -> None:
        """The worker loop; cancelled at teardown (see close())."""
        renewer = asyncio.create_task(self._renew_forever(), name="jobs-lease-renewal")
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.poll_sec):
                        await self._wake.wait()
                self._wake.clear()
                if not self._claiming:
                    continue
                await self._claim_some()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.config.poll_sec
                    await self._sweep_hooks()
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    def _db_trouble(self, what: str, err: BaseException) -> None:
        if self._db_ok:
            log.warning("jobs: %s failed (%s); will retry", what, type(err).__name__)
        self._db_ok = False

    async def _claim_some(self) -> None:
        free = self.config.concurrency - len(self._running)
        if free <= 0:
            return
        models = [m for m in self.router.models() if can_answer(self.router, m)]
        try:
            claimed = await _retrying(lambda: jobstore.claim(
                self.pool, worker=self.name, limit=free, models=models,
                max_age_sec=self.config.max_age_sec, lease_sec=self.config.lease_sec,
                running=list(self._running)))
        except DB_ERRORS as err:
            self._db_trouble("claim", err)
            return
        self.claim_rounds += 1
        if not self._db_ok:
            log.info("jobs: database reachable again")
            self._db_ok = True
        for job in claimed:
            self.claimed += 1
            task = asyncio.create_task(self._run(job), name=f"job {job.id}")
            self._running[job.id] = task

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_sec / 3)
            ids = list(self._running)
            if not ids:
                continue
            try:
                kept = await _retrying(lambda ids=ids: jobstore.renew(  # type: ignore[misc]
                    self.pool, worker=self.name, ids=ids, lease_sec=self.config.lease_sec))
            except DB_ERRORS as err:
                self._db_trouble("lease renewal", err)
                continue
            if kept < len(ids):
                log.warning("jobs: %d leases were lost (taken over after expiry)",
                            len(ids) - kept)

    async def _run(self, job: Job) -> None:
        started = time.monotonic()
        try:
            outcome = await self._attempt(job, started)
            await self._record(job, outcome)
        finally:
            self._running.pop(job.id, None)
            self._wake.set()  # a slot is free

    async def _attempt(self, job: Job, started: float) -> Outcome:
        try:
            chat = request_decoder.decode(job.request)
        except msgspec.MsgspecError:
            bad = GatewayError("The stored request is not a valid chat request.",
                               code="invalid_job_request")
            return Outcome("failed", error=error_object(bad))
        if not can_answer(self.router, job.model):
            # Claimed for its age (or an expired lease) while nobody can answer it.
            if job.age_sec >= self.config.max_age_sec:
                return self._dead(job, ServiceUnavailable(
                    f"No provider of model {job.model!r} could answer within the job's age "
                    f"limit of {self.config.max_age_sec:g} s.", code="job_expired"), started)
            return Outcome("queued", delay_sec=self.config.poll_sec, attempts_delta=-1)
        req = Request(chat=chat, request_id=f"{job.id}.{job.attempts}",
                      deadline=time.monotonic() + self.settings.request_timeout_sec,
                      passthrough={}, may_queue=False)
        try:
            answer = await self.dispatcher.complete(req)
        except GatewayError as err:
            if err.status in _CALLER_STATUSES:
                return Outcome("failed", error=error_object(err))
            return self._retry(job, err, started)
        except QueueInstead:
            return self._retry(job, ServiceUnavailable(
                "No provider can answer this model right now."), started)
        except Exception:
            log.exception("job attempt failed with a bug", extra={"job_id": job.id})
            return self._retry(job, GatewayError("The gateway failed while running the job.",
                                                 code="internal_error"), started)
        return Outcome("succeeded", result=answer.completion.body, provider=answer.provider)

    def _dead(self, job: Job, err: GatewayError, started: float) -> Outcome:
        age = job.age_sec + time.monotonic() - started
        message = (f"The job was given up after {job.attempts} attempt(s) over {age:.0f} s; "
                   f"the last failure: {err.message}")
        return Outcome("dead", error=error_object(err, message))

    def _retry(self, job: Job, err: GatewayError, started: float) -> Outcome:
        c = self.config
        age = job.age_sec + time.monotonic() - started
        if job.attempts >= c.max_attempts or age >= c.max_age_sec:
            return self._dead(job, err, started)
        ceiling = min(c.backoff_max_sec, c.backoff_base_sec * 2 ** (job.attempts - 1))
        # Half fixed, half jitter: spreads a burst of jobs that failed together, and
        # still waits at least half the backoff.
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if err.retry_after is not None:
            delay = max(delay, min(err.retry_after, c.backoff_max_sec))
        log.info("job attempt failed; queued again", extra={
            "job_id": job.id, "attempts": job.attempts, "code": err.code,
            "retry_in": round(delay, 3)})
        return Outcome("queued", delay_sec=delay)

    async def _record(self, job: Job, outcome: Outcome) -> None:
        """Write the outcome; while Postgres is away, keep it and try again (the answer
        is not thrown away), until the lease is known to be lost."""
        wait = 0.2
        while True:
            try:
                rec = await _retrying(lambda: jobstore.finish(
                    self.pool, job.id, worker=self.name, status=outcome.status,
                    result=outcome.result, error=outcome.error, provider=outcome.provider,
                    delay_sec=outcome.delay_sec, attempts_delta=outcome.attempts_delta,
                    hook_lease_sec=self.hook_lease_sec))
                break
            except DB_ERRORS as err:
                self._db_trouble("recording a job's outcome", err)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)
        if rec is None:
            self.lost_leases += 1
            log.warning("job lease lost before its outcome was recorded; another process "
                        "has it", extra={"job_id": job.id, "outcome": outcome.status})
            return
        self.finished[outcome.status] = self.finished.get(outcome.status, 0) + 1
        if rec["status"] in jobstore.FINAL:
            log.info("job %s", rec["status"], extra={"job_id": job.id,
                                                     "attempts": rec["attempts"]})
            if rec["callback_url"]:
                self._deliver(rec)

    # -- webhooks ---------------------------------------------------------------------------

    def _deliver(self, rec: asyncpg.Record) -> None:
        task = asyncio.create_task(self._deliver_one(rec), name=f"webhook {rec['id']}")
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _sweep_hooks(self) -> None:
        """Take over webhooks whose deliverer died (their lease expired)."""
        free = HOOK_CONCURRENCY - len(self._hooks)
        if free <= 0:
            return
        try:
            recs = await _retrying(lambda: jobstore.claim_hooks(
                self.pool, limit=free, lease_sec=self.hook_lease_sec))
        except DB_ERRORS as err:
            self._db_trouble("webhook sweep", err)
            return
        for rec in recs:
            self._deliver(rec)

    async def _deliver_one(self, rec: asyncpg.Record) -> None:
        job = jobstore.job_object(rec)
        # Stable across retries and processes; a replayed job that finishes again is a
        # new message (its outcome may differ).
        msg_id = f"msg_{rec['id']}_{rec['replays']}"
        payload = encoder.encode({
            "type": f"chat.job.{rec['status']}",
            "timestamp": datetime.fromtimestamp(rec["updated_at"], UTC).isoformat(),
            "data": job})
        async with self._hook_slots:
            if self.sender is None:
                delivered, attempts = False, [jobstore.Delivery(
                    attempt=0, status=None, error="no BULWARK_WEBHOOK_SECRET", duration_ms=0.0)]
            else:
                delivered, attempts = await self.sender.deliver(rec["callback_url"], msg_id,
                                                                payload)
        for wait in (0.2, 1.0, 5.0, None):
            try:
                await _retrying(lambda: jobstore.record_delivery(
                    self.pool, job_id=rec["id"], webhook_id=msg_id, delivered=delivered,
                    attempts=attempts))
                break
            except DB_ERRORS as err:
                if wait is None:
                    # The lease will expire and the message go out again: receivers
                    # deduplicate by webhook-id, as Standard Webhooks asks of them.
                    log.warning("webhook outcome not recorded: %s", type(err).__name__,
                                extra={"job_id": rec["id"]})
                    return
                await asyncio.sleep(wait)
        log.log(logging.INFO if delivered else logging.WARNING,
                "webhook %s", "delivered" if delivered else "failed",
                extra={"job_id": rec["id"], "attempts": len(attempts)})

    # -- shutdown ---------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        self._claiming = False

    async def close(self) -> None:
        """Cancel running jobs and give their leases back, so that another process takes
        them now rather than after the lease expires."""
        self._claiming = False
        ids = list(self._running)
        tasks = list(self._running.values())
        hooks = list(self._hooks)
        for task in (*tasks, *hooks):
            task.cancel()
        await asyncio.gather(*tasks, *hooks, return_exceptions=True)
        await self.idempotency.close()
        if not ids:
            return
        try:
            async with asyncio.timeout(1.0):
                n = await _retrying(lambda: jobstore.release(self.pool, worker=self.name,
                                                             ids=ids))
            log.info("jobs: returned %d leases on shutdown", n)
        except _CLOSE_ERRORS as err:
            log.warning("jobs: leases not returned (%s); they expire in %g s",
                        type(err).__name__, self.config.lease_sec)


Context = Callable[[web.Application], AsyncIterator[None]]


class Wiring(NamedTuple):
    """How the app takes jobs in: cleanup contexts for the store (pool, webhook session;
    before the bus, which must LISTEN for jobs before it starts) and the worker (after the
    bus, so torn down first), and a shutdown hook that stops claiming at SIGTERM."""

    store: Context
    worker: Context
    on_shutdown: Callable[[web.Application], Awaitable[None]]


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset query when a connection goes back to the pool: asyncpg's default one
    (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) is a second round trip per statement,
    and nothing here leaves session state behind (no SET, LISTEN, cursor or lock)."""


def jobs_contexts(settings: Settings, env: Mapping[str, str] | None, *,
                  jobs_key: web.AppKey[Jobs], dispatcher_key: web.AppKey[Dispatcher],
                  router_key: web.AppKey[Router]) -> Wiring:
    """The jobs' resources for create_app (keys passed in: keys.py imports this module)."""
    config = jobstore.jobs_config(env)
    signer = signer_from_env(env)
    assert settings.database_url is not None

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=0,  # starts (and keeps serving live traffic) with Postgres down
            max_size=config.db_pool_size, timeout=5.0, command_timeout=COMMAND_TIMEOUT_SEC,
            reset=_keep_session,
            server_settings={"application_name": f"bulwark-jobs {process_name()}"[:63]})
        # Its own session: receivers are arbitrary hosts, unlike the providers' pool, and
        # each delivery attempt is traced to be recorded.
        connector = aiohttp.TCPConnector(limit=HOOK_CONCURRENCY, limit_per_host=4)
        session = aiohttp.ClientSession(connector=connector, trace_configs=[trace_config()])
        sender = None if signer is None else WebhookSender(
            session, signer, attempts=config.webhook_attempts,
            backoff_sec=config.webhook_backoff_sec, timeout_sec=config.webhook_timeout_sec)
        app[jobs_key] = Jobs(pool, config=config, settings=settings,
                             dispatcher=app[dispatcher_key], router=app[router_key],
                             signer=signer, sender=sender)
        try:
            yield
        finally:
            await session.close()
            try:
                await asyncio.wait_for(pool.close(), 2.0)
            except _CLOSE_ERRORS:
                pool.terminate()

    async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
        jobs = app[jobs_key]
        task = asyncio.create_task(jobs.run(), name="jobs-worker")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await jobs.close()

    async def on_shutdown(app: web.Application) -> None:
        app[jobs_key].stop_claiming()

    return Wiring(store_ctx, worker_ctx, on_shutdown)
