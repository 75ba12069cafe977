"""What the status page shows, and the live feed that keeps it current.

The board builds one snapshot of the fleet as this process sees it — each provider's
health and breaker (from the bus-fed `View` and the local breakers), the degradation
level (fleet keys), recent probes and incidents (history tables) — and pushes it to
every open `/status/events` stream whenever it changes:

- at once when the bus applies a provider row or a fleet key (`View.subscribe`,
  `View.subscribe_fleet`): a breaker opening anywhere in the fleet reaches the page as
  fast as it reaches the routers;
- on a short tick, for what has no notification: new probe samples in Postgres, a local
  breaker moving without a database, an operator override expiring. The tick runs only
  while someone watches and sends nothing when nothing changed.

The history is read from Postgres (a status page is not the request path) through the
board's own small pool, with a timeout, cached for `HISTORY_TTL_SEC`: a hundred open pages
cost one set of queries a second, not a hundred. Each stream has a bounded queue; a slow
reader loses the oldest snapshots, never the newest (each one is whole).

Nothing on the board identifies a client or carries a prompt, an upstream's words or a
secret: providers by configured name and kind only (no URL, no key variable), failures by
class and count only, breaker changes by the gateway's own reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from bulwark.breaker import State
from bulwark.bus import CONNECTION_ERRORS
from bulwark.config import Provider, Settings
from bulwark.degradation import effective
from bulwark.history import EMPTY, History, recent_history
from bulwark.state import FleetRow, Health, StateRow, View
from service.router import Router

log = logging.getLogger("bulwark.status")

#: A history older than this is re-read before it is shown: "recent probes" lag by at
#: most this plus healthd's flush period.
HISTORY_TTL_SEC = 1.0
#: Bound on one history read: a slow database delays the page's numbers, never the page.
HISTORY_TIMEOUT_SEC = 1.0
#: Bound on building one snapshot (the history read included): past it, the next tick.
SNAPSHOT_TIMEOUT_SEC = 3.0
#: How often an open page is re-checked for changes that come without a notification.
TICK_SEC = 2.0
#: Changes that arrive together (a breaker opening on three processes) become one event.
COALESCE_SEC = 0.05
#: Snapshots waiting per stream; each is whole, so a reader this far behind needs only
#: the newest.
QUEUE_SIZE = 8
DB_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)

_encode = msgspec.json.Encoder().encode
def sse(event: str, data: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class StatusBoard:
    def __init__(self, settings: Settings, providers: list[Provider], view: View,
                 router: Router, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.providers = providers
        self.view = view
        self.router = router
        self._clock = clock
        self._pool: asyncpg.Pool | None = None
        self._history = EMPTY
        self._history_at = float("-inf")
        #: None: no database configured; False: the last read failed.
        self.history_ok: bool | None = None
        self._history_lock = asyncio.Lock()
        self._streams: set[asyncio.Queue[bytes | None]] = set()
        self._changed = asyncio.Event()
        self._last: bytes = b""
        self.dropped = 0
        view.subscribe(self._on_row)
        view.subscribe_fleet(self._on_fleet)

    # -- what changes ------------------------------------------------------------------

    def _on_row(self, row: StateRow) -> None:
        self._changed.set()

    def _on_fleet(self, row: FleetRow) -> None:
        if row.key.startswith(("degradation/", "breaker/forced/")):
            self._changed.set()

    # -- the history (Postgres) --------------------------------------------------------

    async def pool(self) -> asyncpg.Pool | None:
        """The board's read pool (one connection, opened on first use)."""
        if self._pool is None and self.settings.database_url:
            self._pool = await asyncpg.create_pool(
                self.settings.database_url, min_size=0, max_size=1,
                timeout=HISTORY_TIMEOUT_SEC,
                server_settings={"application_name": "bulwark-status"})
        return self._pool

    async def history(self) -> History:
        """The recent history, at most HISTORY_TTL_SEC old, or the last one read."""
        if not self.settings.database_url:
            return self._history
        if self._history_lock.locked():
            # A read is under way (or stuck in a connect that ignores cancellation): the
            # page gets the last history now rather than waiting behind it.
            return self._history
        async with self._history_lock:
            if time.monotonic() - self._history_at < HISTORY_TTL_SEC:
                return self._history
            try:
                async with asyncio.timeout(HISTORY_TIMEOUT_SEC):
                    pool = await self.pool()
                    assert pool is not None
                    async with pool.acquire() as conn:
                        self._history = await recent_history(conn)
                self.history_ok = True
            except DB_ERRORS as err:
                if self.history_ok is not False:
                    log.warning("status: history unavailable (%s)", type(err).__name__)
                self.history_ok = False
            # A failed read is not retried before the TTL either: a database that is
            # down must not be asked a hundred times a second by a hundred pages.
            self._history_at = time.monotonic()
            return self._history

    async def ping(self, timeout: float) -> float:
        """Postgres round trip in ms (`select 1` on the read pool); raises when unreachable."""
        pool = await self.pool()
        if pool is None:
            raise OSError("no DATABASE_URL")
        async with asyncio.timeout(timeout):
            started = time.perf_counter()
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            return (time.perf_counter() - started) * 1000

    # -- the snapshot ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        hist = self._history
        providers = []
        for p in self.providers:
            rt = self.router.runtimes.get(p.name)
            row = self.view.rows.get(p.name)
            local = str(rt.breaker.state) if rt is not None else "closed"
            # provider_state keeps one reason, the last writer's (often healthd about
            # health): the breaker's own is that of the change that put it where it is.
            moved = next((i for i in hist.incidents
                          if i.provider == p.name and i.to_state == local), None)
            if local == str(State.CLOSED):
                reason = ""
            elif moved is not None:
                reason = moved.reason
            elif row is not None and row.breaker == local:
                reason = row.reason
            elif local == str(State.OPEN):
                reason = "opened by this process's own failed requests"
            else:
                reason = ""
            forced = self.view.fleet_value(f"breaker/forced/{p.name}")
            stats = hist.stats.get(p.name)
            providers.append({
                "name": p.name,
                "kind": p.kind,
                "priority": p.priority,
                "health": str(row.health if row is not None else Health.UNKNOWN),
                "reason": row.reason if row is not None else "",
                "breaker": local,
                "breaker_reason": reason,
                "forced": ({"reason": forced.get("reason", ""),
                            "expires_at": forced.get("expires_at")}
                           if isinstance(forced, dict) else None),
                "probes": [msgspec.to_builtins(s) for s in hist.probes.get(p.name, [])],
                "probe_stats": None if stats is None else msgspec.to_builtins(stats),
            })
        if self.settings.database_url:
            fresh = self.view.healthd_fresh(self.settings.healthd_interval_sec)
            shared = {"synced": self.view.synced, "healthd": "fresh" if fresh else "stale",
                      "history": "ok" if self.history_ok else "unavailable"}
        else:
            shared = {"synced": False, "healthd": "off", "history": "off"}
        return {
            "degradation": msgspec.to_builtins(effective(self.view, now)[1]),
            "providers": providers,
            "incidents": [msgspec.to_builtins(i) for i in hist.incidents],
            "errors": [msgspec.to_builtins(e) for e in hist.errors],
            "errors_window_sec": hist.errors_window_sec,
            "shared": shared,
        }

    async def current(self) -> bytes:
        await self.history()
        return _encode(self.snapshot())

    # -- the streams -------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._streams.add(q)
        # Wake the loop: while nobody watched it waited for a change with no tick, and a
        # page opened after the last change would otherwise never see what has no NOTIFY
        # (new probe samples) until the next one.
        self._changed.set()
        return q

    def unsubscribe(self, q: asyncio.Queue[bytes | None]) -> None:
        self._streams.discard(q)

    @property
    def watchers(self) -> int:
        return len(self._streams)

    def _offer(self, q: asyncio.Queue[bytes | None], item: bytes | None) -> None:
        if q.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()
                self.dropped += 1
        q.put_nowait(item)

    def close_all(self) -> None:
        """Shutdown: every stream ends (its handler returns) instead of holding the drain."""
        for q in list(self._streams):
            self._offer(q, None)

    async def run(self) -> None:
        """Owned task: wait for a change (or the tick while watched), push what is new."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_SEC if self._streams else None):
                    await self._changed.wait()
                    await asyncio.sleep(COALESCE_SEC)
            self._changed.clear()
            if not self._streams:
                continue
            try:
                # Bounded: whatever the history read does, the board keeps turning.
                async with asyncio.timeout(SNAPSHOT_TIMEOUT_SEC):
                    payload = await self.current()
            except TimeoutError:
                log.warning("status: snapshot took over %s s; trying again", SNAPSHOT_TIMEOUT_SEC)
                continue
            except Exception:
                # A bug in one snapshot must not end live updates for every open page:
                # log it, and try again at the next change or tick.
                log.exception("status: snapshot failed")
                continue
            if payload == self._last:
                continue
            self._last = payload
            event = sse("state", payload)
            for q in list(self._streams):
                self._offer(q, event)

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self.run(), name="status-board")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            pool, self._pool = self._pool, None
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), 2.0)
                except DB_ERRORS:
                    pool.terminate()
