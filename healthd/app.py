"""The health daemon: campaign for the lock, and while leader, probe, score and publish.

Resources (one HTTP session, the bus) live for the whole process; the leader's duties —
probe loops, the publisher, the recovery timer, the sample flusher, retention, the lock
watch and heartbeat — live only while this process holds the lock, and all stop together
when it is lost (a standby may already have taken over) or when the process is told to
stop. Nothing here ever ends the process on a transient fault: honcho takes the whole
formation down when one process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Final

import aiohttp
import asyncpg
import msgspec
from aiohttp.resolver import AsyncResolver

from bulwark import forced
from bulwark.breaker import BreakerConfig, Transition
from bulwark.bus import CONNECTION_ERRORS, Bus, HealthSample, prune
from bulwark.cache import prune as prune_cache
from bulwark.config import Provider
from bulwark.jobstore import JobsConfig
from bulwark.providers.base import Adapter, ProbeResult
from bulwark.providers.registry import make_adapter
from bulwark.state import FleetRow, Health, StateRow, View
from bulwark.telemetry import Tracing
from healthd import metrics
from healthd.degradation import publish_auto
from healthd.dlq import DlqReplayer
from healthd.leader import DB_ERRORS, LeaderLock
from healthd.probe import ProbeLoop
from healthd.recovery import SOURCE, Recovery
from healthd.scoring import HealthWindow, ScoringConfig

log = logging.getLogger("healthd")

#: Retention runs this often; deleting a day's rows in one statement per table is cheap.
RETENTION_EVERY_SEC: Final = 3600.0
#: Flush samples early past this many; one multi-row insert stays small.
SAMPLE_BATCH: Final = 500
#: Samples kept while Postgres is unreachable; beyond that the oldest are dropped (a
#: history gap is better than a daemon that grows until it is killed).
SAMPLE_BACKLOG: Final = 20_000
#: Unpublished changes kept per provider while Postgres is unreachable; only the latest
#: matter once it is back, so the oldest go first.
INTENT_BACKLOG: Final = 16


class HealthdConfig(msgspec.Struct, frozen=True, kw_only=True):
    dsn: str
    interval: float
    holder: str
    breaker: BreakerConfig
    scoring: ScoringConfig = msgspec.field(default_factory=ScoringConfig)
    retention_days: float = 7.0
    retry_after_cap: float = 10.0
    #: Stored answers (response_cache) older than this are pruned: the largest cache_ttl_sec.
    cache_keep_sec: float = 86_400.0
    #: … and the oldest beyond this many bytes in total.
    cache_max_bytes: int = 1 << 30
    #: DLQ replay pace and jobs retention (bulwark/jobstore.py, docs/JOBS.md).
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)

    @property
    def fence_sec(self) -> float:
        # The leader queries its lock session every interval/2; three intervals of silence
        # means it is frozen or gone, and a standby takes over one interval/4 later.
        return max(3 * self.interval, 3.0)

    @property
    def check_timeout(self) -> float:
        # A check slower than this counts as a lost connection. Not below 1 s: a loaded
        # CI box or a busy database must not make a healthy leader step down.
        return max(self.interval / 2, 1.0)


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Intent(msgspec.Struct, frozen=True, kw_only=True):
    """One change to write to the shared state."""

    provider: str
    reason: str
    health: Health | None = None
    breaker: str | None = None
    open_for: float | None = None


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for the event at most `seconds`; True when it is set."""
    try:
        await asyncio.wait_for(event.wait(), max(seconds, 0.0))
    except TimeoutError:
        return event.is_set()
    return True


class Leadership:
    """What the leader does, for one term (from taking the lock to losing it)."""

    def __init__(self, config: HealthdConfig, providers: Sequence[Provider], bus: Bus,
                 view: View) -> None:
        self.config = config
        self.providers = list(providers)
        self.bus = bus
        self.view = view
        self.windows = {p.name: HealthWindow(config.scoring) for p in providers}
        self.recovery = Recovery(self.windows, config.breaker, clock=time.monotonic)
        #: Filled by the caller once the loops exist (they need this object as handler).
        self.loops: dict[str, ProbeLoop] = {}
        #: The health the shared state has (or will have once the outbox is written).
        self.known: dict[str, Health] = {}
        self.intents: dict[str, deque[Intent]] = {
            p.name: deque(maxlen=INTENT_BACKLOG) for p in providers}
        self.samples: deque[HealthSample] = deque(maxlen=SAMPLE_BACKLOG)
        self._publish_wake = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._flush_wake = asyncio.Event()
        # A snapshot of the shared state as this term starts: breakers other processes
        # opened, and whatever the previous leader last said.
        for row in view.rows.values():
            self.adopt(row, snapshot=True)
        for key, fleet_row in view.fleet.items():
            name = forced.provider_of(key)
            if name is not None and name in self.windows:
                self.recovery.hold(name, forced.deadline(fleet_row.value))

    # -- the shared state comes in -------------------------------------------------------------

    def adopt(self, row: StateRow, *, snapshot: bool = False) -> None:
        if row.provider not in self.windows:
            return
        self.recovery.adopt(row, snapshot=snapshot)
        if snapshot or row.updated_by != SOURCE:
            self.known[row.provider] = row.health
        self._collect_transitions()
        self._timer_wake.set()

    def wake_timer(self) -> None:
        self._timer_wake.set()

    # -- probes ------------------------------------------------------------------------------

    def before_probe(self, name: str) -> int | None:
        return self.recovery.before_probe(name)

    async def after_probe(self, name: str, result: ProbeResult, token: int | None) -> None:
        metrics.probed(name, result)
        self.samples.append(HealthSample(
            provider=name, at=dt.datetime.now(dt.UTC), ok=result.ok,
            latency_ms=result.latency_ms, ttft_ms=result.ttft_ms,
            error_class=result.error_class, status=result.status))
        if len(self.samples) >= SAMPLE_BATCH:
            self._flush_wake.set()
        previous = self.windows[name].health
        verdict = self.windows[name].add(result.ok, result.latency_ms, result.error_class)
        metrics.HEALTH.labels(name).set(metrics.HEALTH_VALUES[verdict.health])
        if verdict.health is not previous:
            level = logging.WARNING if verdict.health is Health.UNHEALTHY else logging.INFO
            log.log(level, "health %s -> %s", previous, verdict.health, extra={
                "provider": name, "transition": f"{previous}->{verdict.health}",
                "reason": verdict.reason})
        if verdict.health is not Health.UNKNOWN and verdict.health != self.known.get(name):
            self.known[name] = verdict.health
            self._queue(Intent(provider=name, health=verdict.health, reason=verdict.reason))
        self.recovery.after_probe(name, token, ok=result.ok, duration_sec=result.latency_ms / 1000,
                                  reason=result.error_class or "probe failed")
        self._collect_transitions()
        # The breaker may have reopened: the timer must learn its new period.
        self._timer_wake.set()

    # -- changes go out --------------------------------------------------------------------------

    def _collect_transitions(self) -> None:
        for t in self.recovery.take_outbox():
            self._queue(self._breaker_intent(t))

    @staticmethod
    def _breaker_intent(t: Transition) -> Intent:
        return Intent(provider=t.name, breaker=str(t.to_state), reason=t.reason,
                      open_for=t.open_for)

    def _queue(self, intent: Intent) -> None:
        self.intents[intent.provider].append(intent)
        self._publish_wake.set()

    async def publish_forever(self) -> None:
        """Write queued changes in order per provider; on failure keep them and retry."""
        retry = min(self.config.interval, 1.0)
        while True:
            await self._publish_wake.wait()
            self._publish_wake.clear()
            failed = False
            for queue in self.intents.values():
                while queue:
                    intent = queue[0]
                    health = None if intent.health is None else str(intent.health)
                    row = await self.bus.publish(
                        intent.provider, health=health, breaker=intent.breaker,
                        reason=intent.reason, source=SOURCE, open_for=intent.open_for)
                    if row is None:
                        failed = True
                        break
                    # Unless the backlog overflowed meanwhile and dropped it already.
                    if queue and queue[0] is intent:
                        queue.popleft()
            if failed:
                # Postgres is unreachable (the bus logged it): try again a little later.
                await asyncio.sleep(retry)
                self._publish_wake.set()

    async def recovery_timer(self) -> None:
        """Move breakers to half-open as their open periods end, and probe them at once."""
        while True:
            self._timer_wake.clear()
            for name in self.recovery.due():
                loop = self.loops.get(name)
                if loop is not None:
                    loop.kick()
            self._collect_transitions()
            due_in = self.recovery.next_due_in()
            wait = self.config.interval if due_in is None else min(due_in, self.config.interval)
            await _wait(self._timer_wake, wait)

    async def flush_samples(self) -> None:
        """Write probe samples in batches, once per interval (or when a batch fills)."""
        while True:
            await _wait(self._flush_wake, self.config.interval)
            self._flush_wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self.samples:
            return
        batch = list(self.samples)
        stored = await self.bus.record_samples(batch)
        if stored:
            # Only what was sent: probes that finished meanwhile stay queued.
            for _ in range(min(len(batch), len(self.samples))):
                self.samples.popleft()

    async def upsert_providers(self) -> None:
        """Write the config snapshot once per term, retrying while Postgres is away."""
        while True:
            if await self.bus.upsert_providers(self.providers):
                return
            # The bus has logged why; the snapshot is informational, so no hurry.
            await asyncio.sleep(max(self.config.interval, 1.0))

    async def retention(self) -> None:
        """Prune old history every hour (first soon after taking the lead)."""
        await asyncio.sleep(min(self.config.interval, 5.0))
        while True:
            try:
                conn = await asyncpg.connect(self.config.dsn, timeout=10)
                try:
                    deleted = await prune(conn, keep_days=self.config.retention_days)
                    deleted["response_cache"] = await prune_cache(
                        conn, max_age_sec=self.config.cache_keep_sec,
                        max_bytes=self.config.cache_max_bytes)
                finally:
                    await conn.close(timeout=2)
                log.info("retention: pruned rows older than %s days", self.config.retention_days,
                         extra={"deleted": sum(deleted.values())})
            except DB_ERRORS as err:
                log.warning("retention failed, will try again: %s", type(err).__name__)
            await asyncio.sleep(RETENTION_EVERY_SEC)


class Healthd:
    """One healthd process: its resources, and the campaign for the lock."""

    def __init__(self, config: HealthdConfig, providers: Sequence[Provider], *,
                 env: dict[str, str] | None = None, tracing: Tracing | None = None) -> None:
        self.config = config
        self.providers = list(providers)
        self.env = env
        self.tracing = tracing
        self.view = View()
        metrics.HEARTBEAT_AGE.set_function(self._heartbeat_age)
        self.view.subscribe(self._on_row)
        self.view.subscribe_fleet(self._on_fleet)
        self.term: Leadership | None = None
        self.terms = 0

    def _heartbeat_age(self) -> float:
        age = self.view.healthd_age()
        return float("inf") if age is None else age

    def _on_row(self, row: StateRow) -> None:
        if self.term is None:
            return
        try:
            self.term.adopt(row)
        except Exception:
            # Called from the bus's own task: a bug here must not stop the view's updates.
            log.exception("could not adopt a shared row", extra={"provider": row.provider})

    def _on_fleet(self, row: FleetRow) -> None:
        """An operator forced a breaker open (or reset it): recovery waits for its expiry."""
        name = forced.provider_of(row.key)
        term = self.term
        if term is None or name not in term.windows:
            return
        term.recovery.hold(name, forced.deadline(row.value))
        # The recovery timer must learn the new hold (or its end).
        term.wake_timer()

    async def run(self, stop: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(http_session(self.providers))
            bus = await stack.enter_async_context(shared_state(self.config.dsn, self.view))
            adapters = [make_adapter(p, session, retry_after_cap=self.config.retry_after_cap,
                                     env=self.env) for p in self.providers]
            lock = LeaderLock(self.config.dsn, holder=self.config.holder,
                              fence_sec=self.config.fence_sec)
            try:
                await self._campaign(stop, lock, bus, adapters)
            finally:
                await lock.release()

    async def _campaign(self, stop: asyncio.Event, lock: LeaderLock, bus: Bus,
                        adapters: Sequence[Adapter]) -> None:
        cfg = self.config
        # What was last logged about the lock ("": nothing yet; None: standing by).
        problem: str | None = ""
        while not stop.is_set():
            if await lock.try_acquire(timeout=max(cfg.interval, 2.0)):
                problem = ""
                await self._lead(stop, lock, bus, adapters)
                await lock.release()
                if not stop.is_set():
                    log.warning("stepped down; standing by")
                    # A pause before campaigning again: a standby may take over meanwhile,
                    # and a term that fails at once cannot turn into a busy loop.
                    await _wait(stop, cfg.interval)
                continue
            # Log changes only: a standby retries every interval/4, forever.
            if lock.last_error != problem:
                if lock.last_error is None:
                    log.info("standing by: another healthd holds the lock")
                else:
                    log.warning("cannot reach Postgres, will keep trying: %s", lock.last_error)
                problem = lock.last_error
            await _wait(stop, cfg.interval / 4)

    async def _lead(self, stop: asyncio.Event, lock: LeaderLock, bus: Bus,
                    adapters: Sequence[Adapter]) -> None:
        cfg = self.config
        self.terms += 1
        log.info("leader now", extra={"holder": cfg.holder, "term": self.terms})
        if not lock.held or not await lock.beat(cfg.check_timeout):
            return
        # Start from the shared state as it is now: wait (briefly) for the bus to have
        # loaded a snapshot, so that breakers opened by web processes are adopted.
        for _ in range(int(max(cfg.interval, 1.0) / 0.05)):
            if self.view.synced or stop.is_set():
                break
            await asyncio.sleep(0.05)
        term = Leadership(cfg, self.providers, bus, self.view)
        loops = term.loops
        for adapter in adapters:
            loops[adapter.provider.name] = ProbeLoop(adapter, interval=cfg.interval,
                                                     handler=term, tracing=self.tracing)
        self.term = term
        dlq = DlqReplayer(cfg.dsn, self.view, self.providers,
                          replay_per_sec=cfg.jobs.replay_per_sec,
                          retention_days=cfg.jobs.retention_days,
                          tick_sec=min(cfg.interval, 1.0))
        metrics.LEADER.set(1.0)
        jobs: list[Coroutine[Any, Any, None]] = [
            term.publish_forever(), term.recovery_timer(),
            term.flush_samples(), term.upsert_providers(), term.retention(), dlq.run(),
            publish_auto(bus, self.view, self.providers, cfg.interval),
            *(loop.run() for loop in loops.values()),
        ]
        watch = asyncio.create_task(self._watch(lock), name="healthd-watch")
        tasks = {watch, *(asyncio.create_task(job) for job in jobs)}
        stopping = asyncio.create_task(stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait({*tasks, stopping},
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopping in done or watch in done:
                    break
                for task in done:
                    tasks.discard(task)
                    if task.exception() is not None:
                        # A bug in one duty: step down and start a clean term rather than
                        # carry on half-working (or exit, which would stop the formation).
                        log.error("a leader duty failed; stepping down",
                                  exc_info=task.exception())
                        return
        finally:
            self.term = None
            metrics.LEADER.set(0.0)
            stopping.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
            with contextlib.suppress(TimeoutError, *CONNECTION_ERRORS):
                await asyncio.wait_for(term.flush(), 0.3)

    async def _watch(self, lock: LeaderLock) -> None:
        """Return when the lock is lost; beat every interval, check every half."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        while True:
            await asyncio.sleep(cfg.interval / 2)
            if loop.time() - last_beat >= cfg.interval * 0.9:
                ok = await lock.beat(cfg.check_timeout)
                last_beat = loop.time()
            else:
                ok = await lock.alive(cfg.check_timeout)
            if not ok:
                log.error("lost the lock connection; stepping down")
                return


@contextlib.asynccontextmanager
async def http_session(providers: Sequence[Provider]) -> AsyncIterator[aiohttp.ClientSession]:
    # One probe per provider at a time, so a small pool is plenty; several "providers" may
    # be one host (a proxy, the simulator), hence a per-host limit above one.
    connector = aiohttp.TCPConnector(limit=max(8, 2 * len(providers)), limit_per_host=4,
                                     resolver=AsyncResolver())
    # Each probe sets its own total timeout; these bound what a probe never sets.
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=5)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    try:
        yield session
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.close(), 0.5)


@contextlib.asynccontextmanager
async def shared_state(dsn: str, view: View) -> AsyncIterator[Bus]:
    bus = Bus(dsn, view, name=SOURCE)
    await bus.start()
    try:
        yield bus
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bus.close(), 0.7)
