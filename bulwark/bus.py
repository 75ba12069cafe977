"""The state bus: provider state shared by every process through Postgres LISTEN/NOTIFY.

Writers (`Bus.publish`) change one `provider_state` row, bump its `seq` by exactly one,
record a `breaker_events` row when the breaker moved, and `pg_notify('provider_state',
<the row as JSON>)` — all in one transaction, so a notification is never sent for a
write that did not commit, nor a write committed without its notification.

Readers keep a `bulwark.state.View` fresh. A dedicated listener connection (a pool would
`UNLISTEN *` it on release) LISTENs first and then loads the snapshot, so nothing
committed in between is lost; afterwards each notification is applied in order, and a
seq jump (a notification we never heard) reloads the snapshot. Notifications sent
while we are disconnected are gone for good, hence: on any doubt about the listener,
drop it, reconnect, LISTEN, reload. Doubt comes from the connection's termination
callback (server restart, pg_terminate_backend) or from the periodic heartbeat query
timing out — a frozen backend or a silently dropped TCP path fires no event at all.

The heartbeat query also reads healthd's `healthd_heartbeat` row on the database clock,
so staleness of healthd is measured without trusting any host's clock.

Nothing here raises for connection trouble: a process without Postgres keeps serving
on its last view and catches up when the database returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import asyncpg
import msgspec

from bulwark.config import Provider
from bulwark.state import (
    Applied,
    FleetRow,
    Health,
    StateRow,
    View,
    fleet_decoder,
    row_decoder,
    row_encoder,
)

log = logging.getLogger("bulwark.bus")

CHANNEL = "provider_state"
#: Fleet-wide settings (degradation level, client keys, operator overrides): `fleet_state`.
FLEET_CHANNEL = "fleet_state"
#: A NOTIFY payload must stay under 8000 bytes; a larger fleet value is announced by key
#: and seq only, and the listener reloads.
_PAYLOAD_MAX = 7000
DEFAULT_RETENTION_DAYS = 7.0
RETENTION_ENV = "BULWARK_RETENTION_DAYS"

#: Failures that mean "Postgres is not reachable right now", never a bug of ours.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, terminated
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
)
#: Anything the database can answer with: a process without shared state keeps serving.
_DB_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
#: A pooled connection that died with a server restart fails with one of these once.
_STALE_CONNECTION: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
)

#: Notifications buffered between the callback and the consumer before we give up on
#: them and reload instead; a backlog this deep means the view is stale anyway.
_QUEUE_MAX = 10_000
#: First reconnect delay ceiling (doubled per failure up to reconnect_max_sec).
_BACKOFF_BASE_SEC = 0.1
#: A publish is off the request path but holds a breaker transition: bound it.
_PUBLISH_TIMEOUT_SEC = 2.0

_OPEN_FOR = (
    "CASE WHEN open_until IS NULL THEN NULL"
    " ELSE greatest(0, extract(epoch FROM open_until - now()))::float8 END"
)
# S608: built from constants only, no input reaches these strings.
_SNAPSHOT = (
    f"SELECT provider, health, breaker, reason, seq, {_OPEN_FOR} AS open_for, updated_by"  # noqa: S608
    " FROM provider_state"
)
_FLEET_SNAPSHOT = "SELECT key, value::text AS value, seq, updated_by FROM fleet_state"
_PUT_FLEET = """
INSERT INTO fleet_state AS f (key, value, seq, updated_by, updated_at)
VALUES ($1::text, $2::text::jsonb, 1, $3::text, now())
ON CONFLICT (key) DO UPDATE SET
    value = $2::text::jsonb, seq = f.seq + 1, updated_by = $3::text, updated_at = now()
RETURNING key, value::text AS value, seq, updated_by
"""
_HEARTBEAT = (
    "SELECT greatest(0, extract(epoch FROM now() - beat_at))::float8"
    " FROM healthd_heartbeat WHERE id = 1"
)

# Locks the row first, so the breaker we log as the transition's origin is the one
# our update replaces even when writers race. (A FOR UPDATE CTE in the upsert itself
# would not do: it runs after the upsert has touched the row and then sees nothing.)
_LOCK_ROW = "SELECT breaker FROM provider_state WHERE provider = $1 FOR UPDATE"

# Upsert with seq + 1 and log the breaker transition. $1 provider, $2 health, $3 breaker,
# $4 reason, $5 open_for seconds, $6 source, $7 the breaker before (NULL: no row yet,
# which counts as "closed", the state of a provider nobody has written about).
# A breaker moving anywhere but "open" clears open_until; a health-only write keeps it.
_PUBLISH = f"""
WITH up AS (
    INSERT INTO provider_state AS s
        (provider, health, breaker, reason, seq, open_until, updated_by, updated_at)
    VALUES (
        $1::text, coalesce($2::text, 'unknown'), coalesce($3::text, 'closed'), $4::text, 1,
        CASE WHEN $3::text = 'open' AND $5::float8 IS NOT NULL
             THEN now() + make_interval(secs => $5::float8) END,
        $6::text, now())
    ON CONFLICT (provider) DO UPDATE SET
        health = coalesce($2::text, s.health),
        breaker = coalesce($3::text, s.breaker),
        reason = $4::text,
        seq = s.seq + 1,
        open_until = CASE
            WHEN $3::text IS NULL THEN s.open_until
            WHEN $3::text = 'open' AND $5::float8 IS NOT NULL
                THEN now() + make_interval(secs => $5::float8)
            END,
        updated_by = $6::text,
        updated_at = now()
    RETURNING s.provider, s.health, s.breaker, s.reason, s.seq, s.open_until, s.updated_by
), event AS (
    INSERT INTO breaker_events (provider, from_state, to_state, reason, source)
    SELECT up.provider, coalesce($7::text, 'closed'), up.breaker, up.reason, $6::text
    FROM up
    WHERE $3::text IS NOT NULL AND up.breaker IS DISTINCT FROM coalesce($7::text, 'closed')
)
SELECT provider, health, breaker, reason, seq, {_OPEN_FOR} AS open_for, updated_by FROM up
"""  # noqa: S608

_INSERT_SAMPLES = """
INSERT INTO health_samples (provider, at, ok, latency_ms, ttft_ms, error_class, status)
SELECT p, coalesce(a, now()), o, l, t, e, s
FROM unnest($1::text[], $2::timestamptz[], $3::bool[], $4::float8[], $5::float8[],
            $6::text[], $7::int[]) AS u(p, a, o, l, t, e, s)
"""

_INSERT_ERRORS = """
INSERT INTO service_errors (at, provider, request_id, model, error_class, status, detail)
SELECT coalesce(a, now()), p, r, m, e, s, d
FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
            $7::text[]) AS u(a, p, r, m, e, s, d)
"""

_INSERT_FALLBACKS = """
INSERT INTO fallback_events (at, kind, model, provider)
SELECT a, k, m, p FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[])
    AS u(a, k, m, p)
"""

_UPSERT_PROVIDERS = """
INSERT INTO providers (name, kind, base_url, priority, weight, models, updated_at)
SELECT n, k, b, p, w, m, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::float8[], $6::jsonb[])
    AS u(n, k, b, p, w, m)
ON CONFLICT (name) DO UPDATE SET
    kind = excluded.kind, base_url = excluded.base_url, priority = excluded.priority,
    weight = excluded.weight, models = excluded.models, updated_at = now()
"""

T = TypeVar("T")
if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _PoolConn: TypeAlias = PoolConnectionProxy[asyncpg.Record]


class HealthSample(msgspec.Struct, frozen=True, kw_only=True):
    """One healthd ping outcome (a `health_samples` row)."""

    provider: str
    ok: bool
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error_class: str | None = None
    status: int | None = None
    at: datetime | None = None  # None: the database's now()


class ServiceError(msgspec.Struct, frozen=True, kw_only=True):
    """One failure seen by a web process (a `service_errors` row); detail is pre-sanitised."""

    error_class: str
    provider: str | None = None
    request_id: str | None = None
    model: str | None = None
    status: int | None = None
    detail: str | None = None
    at: datetime | None = None  # None: the database's now()


class FallbackEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One answer that was not the first choice's (a `fallback_events` row)."""

    kind: str
    at: datetime
    model: str | None = None
    provider: str | None = None


class _Lost:
    """Queue item from a termination callback: this listener connection is gone."""

    __slots__ = ("conn",)

    def __init__(self, conn: object) -> None:
        self.conn = conn


class _ListenerLost(Exception):
    """The listener connection can no longer be trusted to deliver notifications."""


_LISTENER_ERRORS: tuple[type[Exception], ...] = (_ListenerLost, *_DB_ERRORS)


def _state_row(rec: asyncpg.Record) -> StateRow:
    try:
        health = Health(rec["health"])
    except ValueError:
        log.warning(
            "provider %s: unknown health %r in the database", rec["provider"], rec["health"]
        )
        health = Health.UNKNOWN
    return StateRow(
        provider=rec["provider"],
        health=health,
        breaker=rec["breaker"],
        reason=rec["reason"],
        seq=rec["seq"],
        open_for=rec["open_for"],
        updated_by=rec["updated_by"],
    )


class Bus:
    """One process's link to the shared provider state (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        view: View,
        *,
        name: str,
        # A frozen backend fires nothing: detection takes up to heartbeat + timeout, so
        # 0.5 + 1.0 keeps detection and resync of a dead listener within the 2 s target.
        heartbeat_sec: float = 0.5,
        heartbeat_timeout_sec: float = 1.0,
        reconnect_max_sec: float = 2.0,
        publish_timeout_sec: float = _PUBLISH_TIMEOUT_SEC,
    ) -> None:
        self._dsn = dsn
        self.view = view
        self.name = name
        self.heartbeat_sec = heartbeat_sec
        self.heartbeat_timeout_sec = heartbeat_timeout_sec
        self.reconnect_max_sec = reconnect_max_sec
        self.publish_timeout_sec = publish_timeout_sec
        # A snapshot is a handful of rows; allow more than a heartbeat, it is not a probe.
        self._query_timeout = max(2.0, 2 * heartbeat_timeout_sec)
        # Bounded so that an unreachable host does not stall the reconnect loop, long
        # enough for a TLS handshake to a remote database.
        self._connect_timeout = max(2.0, heartbeat_timeout_sec)
        self._queue: asyncio.Queue[tuple[str, str] | _Lost] = asyncio.Queue()
        #: Extra channels (`listen`): ephemeral notifications for other modules.
        self._channels: dict[str, Callable[[str], None]] = {}
        #: Called after every snapshot load: users of extra channels reload what they
        #: may have missed while disconnected.
        self._resync: list[Callable[[], None]] = []
        self._overflowed = False
        self._listener: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._ever_connected = False
        self._closed = False
        # Counters for /metrics; monotonic, never reset.
        self.applied = 0
        self.stale = 0
        self.gaps = 0
        self.reloads = 0
        self.reconnects = 0
        self.heartbeats = 0
        self.heartbeat_failures = 0
        self.bad_payloads = 0
        self.overflows = 0
        self.publishes = 0
        #: The last answered heartbeat: its round trip (s) and when it came (unix time).
        self.last_heartbeat_rtt: float | None = None
        self.last_heartbeat_at: float | None = None
        self.publish_failures = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, LISTEN, load the snapshot, start the supervisor; never raises for an
        unreachable database (the supervisor keeps trying in the background)."""
        if self._task is not None:
            return
        try:
            await self._connect()
        except _DB_ERRORS as err:
            log.warning(
                "bus %s: no database at start (%s); serving without shared state",
                self.name,
                _describe(err),
            )
        self._task = asyncio.create_task(self._supervise(), name=f"bus-{self.name}")
        if self._listener is not None:
            # Warm the write pool now, but only with a database to talk to: an
            # unreachable host would add a second connect timeout to start-up.
            with contextlib.suppress(*_DB_ERRORS):
                await self._get_pool()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._listener = self._listener, None
        if conn is not None:
            try:
                await conn.close(timeout=1.0)
            except _DB_ERRORS:
                conn.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=2.0)
            except _DB_ERRORS:
                pool.terminate()

    async def __aenter__(self) -> Bus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Listening and synced: the view reflects the database as of now."""
        conn = self._listener
        return conn is not None and not conn.is_closed() and self.view.synced

    @property
    def listener_pid(self) -> int | None:
        """Backend pid of the listener connection (for operators and chaos tests)."""
        conn = self._listener
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    # -- listening ------------------------------------------------------------------

    def listen(self, channel: str, callback: Callable[[str], None],
               on_resync: Callable[[], None] | None = None) -> None:
        """Deliver every NOTIFY on `channel` to `callback` (in the bus task; it must not
        block). Notifications sent while disconnected are lost: `on_resync` runs after each
        (re)connect so its owner can reload. Call before start()."""
        assert self._task is None, "listen() before start()"
        self._channels[channel] = callback
        if on_resync is not None:
            self._resync.append(on_resync)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        # Callbacks only enqueue: the supervisor task owns the view and the connection.
        if self._queue.qsize() >= _QUEUE_MAX:
            self._overflowed = True
            return
        self._queue.put_nowait((channel, str(payload)))

    def _on_terminated(self, conn: object) -> None:
        self._queue.put_nowait(_Lost(conn))

    def _drain_queue(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": f"bulwark-bus {self.name}"[:63]},
        )
        try:
            conn.add_termination_listener(self._on_terminated)
            # What was queued belongs to a previous connection; the snapshot below covers it.
            self._drain_queue()
            self._overflowed = False
            # LISTEN before the snapshot: a change committed in between then arrives as
            # a notification (stale or applied by seq) instead of being lost.
            for channel in (CHANNEL, FLEET_CHANNEL, *self._channels):
                await conn.add_listener(channel, self._on_notify)
            rows = await conn.fetch(_SNAPSHOT, timeout=self._query_timeout)
            fleet = await conn.fetch(_FLEET_SNAPSHOT, timeout=self._query_timeout)
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn
        self.view.replace(_state_row(r) for r in rows)
        self.view.replace_fleet(_fleet_row(r) for r in fleet)
        self._after_resync()
        self.reloads += 1
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        log.info(
            "bus %s: listening (backend %d), %d providers loaded",
            self.name,
            conn.get_server_pid(),
            len(rows),
        )

    def _drop_listener(self) -> None:
        conn, self._listener = self._listener, None
        self.view.synced = False
        self._drain_queue()
        if conn is not None:
            # Abort, do not close politely: a frozen backend would never answer a goodbye.
            conn.terminate()

    def _backoff(self, failures: int) -> float:
        # Full jitter: N processes that lost the database together do not return together.
        ceiling = min(self.reconnect_max_sec, _BACKOFF_BASE_SEC * (2**failures))
        return random.uniform(0, ceiling)

    async def _supervise(self) -> None:
        failures = 0
        while True:
            conn = self._listener
            try:
                if conn is None:
                    await self._connect()
                    failures = 0
                else:
                    await self._pump(conn)
                continue
            except _LISTENER_ERRORS as err:
                if conn is not None:
                    # Reconnect at once: a lost listener is usually a restarted backend
                    # or a killed session, not a database that is down.
                    log.warning(
                        "bus %s: listener lost (%s); reconnecting", self.name, _describe(err)
                    )
                    self._drop_listener()
                    continue
                if failures == 0:
                    log.warning("bus %s: cannot connect (%s); retrying", self.name, _describe(err))
            except Exception:
                # Subscribers run inside view.apply/replace: a bug of theirs must not end
                # the one task that keeps this process's view alive. Resync, with backoff
                # in case it happens again on every snapshot.
                log.exception("bus %s: unexpected error; resynchronising", self.name)
            self._drop_listener()
            failures += 1
            await asyncio.sleep(self._backoff(failures))

    async def _pump(self, conn: asyncpg.Connection) -> None:
        """Apply notifications and beat the heart until the connection is in doubt."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time()  # measure healthd's age right after (re)connecting
        while True:
            if self._overflowed:
                self.overflows += 1
                self._overflowed = False
                self._drain_queue()
                await self._reload(conn)
            wait = next_beat - loop.time()
            if wait <= 0:
                await self._heartbeat(conn)
                next_beat = loop.time() + self.heartbeat_sec
                continue
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    async with asyncio.timeout(wait):
                        item = await self._queue.get()
                except TimeoutError:
                    continue
            if isinstance(item, _Lost):
                if item.conn is conn:
                    raise _ListenerLost("connection terminated")
                continue
            channel, payload = item
            if channel == CHANNEL:
                await self._handle(conn, payload)
            elif channel == FLEET_CHANNEL:
                await self._handle_fleet(conn, payload)
            else:
                self._channels[channel](payload)

    def _after_resync(self) -> None:
        for callback in self._resync:
            try:
                callback()
            except Exception:
                log.exception("bus %s: resync callback failed", self.name)

    async def _handle_fleet(self, conn: asyncpg.Connection, payload: str) -> None:
        try:
            row = fleet_decoder.decode(payload)
        except msgspec.DecodeError:
            self.bad_payloads += 1
            await self._reload(conn)
            return
        if row.value is None and row.updated_by == "\0big":
            await self._reload(conn)  # too large to carry: announced by key only
            return
        if self._counted(self.view.apply_fleet(row)) == "gap":
            await self._reload(conn)

    def _counted(self, outcome: Applied) -> Applied:
        if outcome == "applied":
            self.applied += 1
        elif outcome == "stale":
            self.stale += 1
        else:
            self.gaps += 1
        return outcome

    async def _handle(self, conn: asyncpg.Connection, payload: str) -> None:
        try:
            row = row_decoder.decode(payload)
        except msgspec.DecodeError:
            self.bad_payloads += 1
            log.warning("bus %s: undecodable notification; reloading", self.name)
            await self._reload(conn)
            return
        if self._counted(self.view.apply(row)) == "gap":
            log.info("bus %s: seq gap on %s (got %d); reloading", self.name, row.provider, row.seq)
            await self._reload(conn)

    async def _reload(self, conn: asyncpg.Connection) -> None:
        # On the listener connection: notifications queued meanwhile are applied after
        # it, and the ones the snapshot already covers are then simply stale.
        rows = await conn.fetch(_SNAPSHOT, timeout=self._query_timeout)
        fleet = await conn.fetch(_FLEET_SNAPSHOT, timeout=self._query_timeout)
        self.view.replace(_state_row(r) for r in rows)
        self.view.replace_fleet(_fleet_row(r) for r in fleet)
        self.reloads += 1
        self._after_resync()

    async def _heartbeat(self, conn: asyncpg.Connection) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.heartbeat_timeout_sec):
                age = await conn.fetchval(_HEARTBEAT)
        except TimeoutError:
            self.heartbeat_failures += 1
            raise _ListenerLost(
                f"heartbeat unanswered for {self.heartbeat_timeout_sec} s"
            ) from None
        self.heartbeats += 1
        self.last_heartbeat_rtt = time.perf_counter() - started
        self.last_heartbeat_at = time.time()
        self.view.note_healthd_age(None if age is None else float(age))

    # -- writing --------------------------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,  # no idle reconnects (and tracebacks) while Postgres is down
                    max_size=2,  # writes are rare and short; the listener is separate
                    timeout=self._connect_timeout,
                    server_settings={"application_name": f"bulwark-bus-w {self.name}"[:63]},
                )
            return self._pool

    async def pool(self) -> asyncpg.Pool:
        """The write pool (small: writes are rare and short). Raises when unreachable."""
        return await self._get_pool()

    async def write(self, what: str, op: Callable[[_PoolConn], Awaitable[T]]) -> T | None:
        """Run `op` on a pooled connection, bounded in time; None when the database cannot
        take it (logged). For other modules' background writes."""
        return await self._write(what, op)

    async def put_fleet(self, key: str, value: Any, *, source: str) -> FleetRow | None:
        """Write one fleet-wide setting (None deletes it) and notify every process.

        Returns the row as written, or None when Postgres is unreachable. Like publish(),
        the local view changes when the notification arrives.
        """

        async def op(conn: _PoolConn) -> FleetRow:
            async with conn.transaction():
                return await put_fleet_on(conn, key, value, source=source)

        row = await self._write(f"put_fleet {key}", op)
        if row is not None:
            self.publishes += 1
        return row

    async def _write(self, what: str, op: Callable[[_PoolConn], Awaitable[T]]) -> T | None:
        """Run `op` on a pooled connection; None when the database cannot take it."""
        if self._closed:
            return None  # shutting down: do not open a new pool behind close()'s back
        try:
            async with asyncio.timeout(self.publish_timeout_sec):
                for attempt in range(2):
                    try:
                        pool = await self._get_pool()
                        async with pool.acquire() as conn:
                            return await op(conn)
                    except _STALE_CONNECTION:
                        # A pooled connection that died with a server restart fails
                        # once; retry on a fresh one. Should the first attempt have
                        # committed after all, the repeat is harmless: every write is a
                        # whole state, seq just moves twice, each with its notification.
                        if attempt:
                            raise
        except _DB_ERRORS as err:
            self.publish_failures += 1
            if isinstance(err, CONNECTION_ERRORS):
                log.warning(
                    "bus %s: %s skipped, database unreachable (%s)",
                    self.name,
                    what,
                    _describe(err),
                )
            else:
                # Reachable but refusing (schema missing, constraint): a deployment bug.
                log.exception("bus %s: %s failed", self.name, what)
            return None
        raise AssertionError("unreachable")  # pragma: no cover

    async def publish(
        self,
        provider: str,
        *,
        breaker: str | None = None,
        health: str | None = None,
        reason: str,
        source: str,
        open_for: float | None = None,
    ) -> StateRow | None:
        """Write one provider's state (seq + 1) and notify every process, ours included.

        Returns the row as written, or None when Postgres is unreachable. The local view
        is not touched here: it changes when the notification arrives, as everywhere.
        """
        health_value = None if health is None else Health(health).value

        async def op(conn: _PoolConn) -> StateRow:
            async with conn.transaction():
                before = await conn.fetchval(_LOCK_ROW, provider)
                rec = await conn.fetchrow(
                    _PUBLISH, provider, health_value, breaker, reason, open_for, source, before
                )
                assert rec is not None  # an upsert always returns its row
                row = _state_row(rec)
                payload = row_encoder.encode(row).decode()
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            return row

        row = await self._write(f"publish {provider}", op)
        if row is not None:
            self.publishes += 1
        return row

    async def record_samples(self, samples: Sequence[HealthSample]) -> bool:
        """Insert health samples in one statement; False when the database is unreachable."""
        if not samples:
            return True

        async def op(conn: _PoolConn) -> bool:
            await conn.execute(
                _INSERT_SAMPLES,
                [s.provider for s in samples],
                [s.at for s in samples],
                [s.ok for s in samples],
                [s.latency_ms for s in samples],
                [s.ttft_ms for s in samples],
                [s.error_class for s in samples],
                [s.status for s in samples],
            )
            return True

        return await self._write("record_samples", op) is not None

    async def record_errors(self, errors: Sequence[ServiceError]) -> bool:
        """Insert service errors in one statement; False when the database is unreachable."""
        if not errors:
            return True

        async def op(conn: _PoolConn) -> bool:
            await conn.execute(
                _INSERT_ERRORS,
                [e.at for e in errors],
                [e.provider for e in errors],
                [e.request_id for e in errors],
                [e.model for e in errors],
                [e.error_class for e in errors],
                [e.status for e in errors],
                [e.detail for e in errors],
            )
            return True

        return await self._write("record_errors", op) is not None

    async def record_fallbacks(self, events: Sequence[FallbackEvent]) -> bool:
        """Insert fallback events in one statement; False when the database is unreachable."""
        if not events:
            return True

        async def op(conn: _PoolConn) -> bool:
            await conn.execute(_INSERT_FALLBACKS, [e.at for e in events],
                               [e.kind for e in events], [e.model for e in events],
                               [e.provider for e in events])
            return True

        return await self._write("record_fallbacks", op) is not None

    async def record_error(
        self,
        *,
        error_class: str,
        provider: str | None = None,
        request_id: str | None = None,
        model: str | None = None,
        status: int | None = None,
        detail: str | None = None,
    ) -> bool:
        return await self.record_errors(
            [
                ServiceError(
                    error_class=error_class,
                    provider=provider,
                    request_id=request_id,
                    model=model,
                    status=status,
                    detail=detail,
                )
            ]
        )

    async def upsert_providers(self, providers: Sequence[Provider]) -> bool:
        """Make the `providers` table the given config (no secrets); others are removed."""

        async def op(conn: _PoolConn) -> bool:
            async with conn.transaction():
                await conn.execute(
                    _UPSERT_PROVIDERS,
                    [p.name for p in providers],
                    [p.kind for p in providers],
                    [p.base_url for p in providers],
                    [p.priority for p in providers],
                    [p.weight for p in providers],
                    [msgspec.json.encode(p.models).decode() for p in providers],
                )
                await conn.execute(
                    "DELETE FROM providers WHERE name <> ALL($1::text[])",
                    [p.name for p in providers],
                )
            return True

        return await self._write("upsert_providers", op) is not None


async def put_fleet_on(conn: _PoolConn | asyncpg.Connection, key: str, value: Any, *,
                       source: str) -> FleetRow:
    """`Bus.put_fleet` on a connection the caller holds, inside the caller's transaction:
    for a module that changes its own table and the fleet row together (client keys), so
    that the two can never disagree. The NOTIFY goes out when that transaction commits."""
    raw = msgspec.json.encode(value).decode()
    rec = await conn.fetchrow(_PUT_FLEET, key, raw, source)
    assert rec is not None
    row = _fleet_row(rec)
    payload = row_encoder.encode(row).decode()
    if len(payload.encode()) > _PAYLOAD_MAX:
        payload = row_encoder.encode(
            FleetRow(key=key, value=None, seq=row.seq, updated_by="\0big")).decode()
    await conn.execute("SELECT pg_notify($1, $2)", FLEET_CHANNEL, payload)
    return row


def _fleet_row(rec: asyncpg.Record) -> FleetRow:
    return FleetRow(key=rec["key"], value=msgspec.json.decode(rec["value"]), seq=rec["seq"],
                    updated_by=rec["updated_by"])


class _Executor(Protocol):
    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str: ...


async def prune(conn: _Executor, *, keep_days: float) -> dict[str, int]:
    """Delete history rows older than keep_days; returns rows deleted per table.

    Run hourly, so each run deletes about an hour's rows: small enough for one
    statement per table, and the (at) indexes make the scan cheap.
    """
    deleted: dict[str, int] = {}
    for table in ("breaker_events", "health_samples", "service_errors", "fallback_events",
                  "feedback"):
        status = await conn.execute(
            f"DELETE FROM {table} WHERE at < now() - make_interval(secs => $1::float8)",  # noqa: S608
            keep_days * 86_400,
        )
        deleted[table] = int(status.rsplit(" ", 1)[-1])
    return deleted


def retention_days(env: Mapping[str, str] | None = None) -> float:
    """Days of history to keep, from BULWARK_RETENTION_DAYS (default 7)."""
    raw = (os.environ if env is None else env).get(RETENTION_ENV, "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS
    try:
        days = float(raw)
    except ValueError:
        raise ValueError(f"{RETENTION_ENV}={raw!r} is not a number") from None
    if not days > 0:
        raise ValueError(f"{RETENTION_ENV}={raw!r} must be positive")
    return days


def _describe(err: BaseException) -> str:
    # Type and message only: a DSN (possibly with a password) never reaches the logs.
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
