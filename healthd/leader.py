"""Leader election: one active healthd, any number of standbys.

The leader is whoever holds a session-level advisory lock on its own dedicated
connection. The lock lives exactly as long as that session: a leader that dies (kill -9)
frees it as soon as its socket closes, and one that freezes or loses its host is fenced
off by the session's `idle_session_timeout` (it queries every interval/2; silence for
three intervals ends the session). A standby polls `pg_try_advisory_lock` every
interval/4, so it takes over within one interval of the lock being freed. The leader also
writes its heartbeat row over that same connection, so a beat that succeeds proves both
"I am alive" and "I still hold the lock".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import asyncpg

from bulwark.bus import CONNECTION_ERRORS

#: Anything a query can fail with that is not a bug of ours: the lock is then in doubt.
DB_ERRORS: Final[tuple[type[BaseException], ...]] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

log = logging.getLogger("healthd.leader")

#: b"bulwarkH" as a big-endian integer: a constant no other advisory-lock user picks by
#: accident, and it fits Postgres's signed bigint (the first byte is below 0x80).
LOCK_KEY: Final = int.from_bytes(b"bulwarkH", "big")

_HEARTBEAT_SQL: Final = """
insert into healthd_heartbeat (id, holder, started_at, beat_at)
values (1, $1, now(), now())
on conflict (id) do update set
    holder = excluded.holder,
    beat_at = excluded.beat_at,
    started_at = case when healthd_heartbeat.holder = excluded.holder
                      then healthd_heartbeat.started_at else excluded.started_at end
"""


class LeaderLock:
    """The advisory lock and the connection that holds it."""

    def __init__(self, dsn: str, *, holder: str, key: int = LOCK_KEY,
                 connect_timeout: float = 5.0, fence_sec: float | None = None) -> None:
        self.dsn = dsn
        #: Postgres ends this session after this long without a query (idle_session_timeout),
        #: freeing the lock. That fences a leader that is frozen (SIGSTOP, a stuck VM) or
        #: whose host vanished without closing the socket: neither fires any disconnect, and
        #: TCP keepalive would take hours — or never notice a frozen but living process.
        self.fence_sec = fence_sec
        self.holder = holder
        self.key = key
        self.connect_timeout = connect_timeout
        self.held = False
        #: Why the last attempt could not even ask for the lock (None: it could).
        self.last_error: str | None = None
        self._beat_failing = False
        self._conn: asyncpg.Connection | None = None

    @property
    def connected(self) -> bool:
        """Whether the lock connection is open (a standby keeps it open between tries)."""
        return self._conn is not None and not self._conn.is_closed()

    async def try_acquire(self, timeout: float) -> bool:
        """One attempt: True when this process holds the lock now. Never raises for
        connection trouble (the caller simply tries again later)."""
        if self.held:
            return True
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=min(timeout, self.connect_timeout),
                    server_settings={"application_name": f"healthd {self.holder}"})
                await self._fence(self._conn, timeout)
            got = await self._conn.fetchval("select pg_try_advisory_lock($1)", self.key,
                                            timeout=timeout)
        except DB_ERRORS as err:
            # Type and message only: a DSN may carry a password.
            self.last_error = f"{type(err).__name__}: {err}"
            await self._drop()
            return False
        self.last_error = None
        self.held = bool(got)
        return self.held

    async def _fence(self, conn: asyncpg.Connection, timeout: float) -> None:
        if self.fence_sec is None:
            return
        try:
            # SET rather than a startup parameter: a server older than 14 does not know
            # the setting, and there the lock must still work, unfenced.
            await conn.execute(
                f"set idle_session_timeout = {int(self.fence_sec * 1000)}", timeout=timeout)
        except asyncpg.PostgresError as err:
            log.warning("cannot fence the lock session (%s); a frozen leader will keep the "
                        "lock until its connection dies", type(err).__name__)

    async def alive(self, timeout: float) -> bool:
        """Is the lock still ours? (Its connection answers.)"""
        conn = self._conn
        if not self.held or conn is None or conn.is_closed():
            return False
        try:
            await conn.fetchval("select 1", timeout=timeout)
        except DB_ERRORS:
            return False
        return True

    async def beat(self, timeout: float) -> bool:
        """Write the heartbeat row; False when the connection (hence the lock) is lost."""
        conn = self._conn
        if not self.held or conn is None or conn.is_closed():
            return False
        try:
            await conn.execute(_HEARTBEAT_SQL, self.holder, timeout=timeout)
        except CONNECTION_ERRORS:
            return False
        except asyncpg.PostgresError as err:
            # Not a lost connection — most likely the schema is not migrated yet (the
            # release step may run alongside). The lock is still ours: keep leading.
            if not self._beat_failing:
                log.warning("cannot write the heartbeat: %s: %s", type(err).__name__, err)
            self._beat_failing = True
            return await self.alive(timeout)
        if self._beat_failing:
            log.info("heartbeat written again")
        self._beat_failing = False
        return True

    async def release(self, timeout: float = 0.5) -> None:
        """Give the lock up and close the connection; never raises, never blocks for long."""
        conn = self._conn
        if conn is not None and not conn.is_closed() and self.held:
            # On failure, closing the session below frees the lock all the same.
            with contextlib.suppress(*DB_ERRORS):
                await conn.fetchval("select pg_advisory_unlock($1)", self.key, timeout=timeout)
        await self._drop(timeout)

    async def _drop(self, timeout: float = 0.5) -> None:
        self.held = False
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await asyncio.wait_for(conn.close(), timeout)
        except DB_ERRORS:
            conn.terminate()
