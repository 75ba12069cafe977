"""The dead-letter queue's replay, and retention of finished jobs — leader duties.

A job is dead once its attempts are spent (web's worker decides that). When a provider of
its model is healthy again, the leader puts the model's dead jobs back in the queue:

- once, fleet-wide: only the leader replays (this task runs only during a term), each
  statement takes its jobs with SKIP LOCKED, and only jobs that died *before* the model
  recovered are taken — a job that dies again after this recovery waits for the next one
  rather than cycling through replays;
- paced: at most `replay_per_sec` jobs a second (each replay is one upstream request
  soon after), so a recovering provider is not met by a thundering herd.

A model is "recovered" when the shared view shows one of its providers healthy with its
breaker not open; the moment is taken on the database's clock, as `dead_at` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import asyncpg

from bulwark import jobstore
from bulwark.config import Provider
from bulwark.jobstore import DB_ERRORS
from bulwark.state import Health, View

log = logging.getLogger("healthd.dlq")

_CLOSE_ERRORS: Final[tuple[type[Exception], ...]] = (TimeoutError, *DB_ERRORS)
#: Pruning runs this often; each run deletes about that much time's rows.
PRUNE_EVERY_SEC: Final = 3600.0
#: Smallest pause between replay batches: at high paces several jobs go per statement.
_MIN_STEP_SEC: Final = 0.05


def recovered_models(view: View, providers: Sequence[Provider]) -> set[str]:
    """Models with at least one provider healthy and not open in the shared state."""
    ok: set[str] = set()
    for p in providers:
        row = view.rows.get(p.name)
        if row is not None and row.health is Health.HEALTHY and row.breaker != "open":
            ok.update(p.models)
    return ok


class DlqReplayer:
    """One term's replay loop (plus retention); runs while this healthd leads."""

    def __init__(self, dsn: str, view: View, providers: Sequence[Provider], *,
                 replay_per_sec: float, retention_days: float, tick_sec: float) -> None:
        self.dsn = dsn
        self.view = view
        self.providers = list(providers)
        self.rate = replay_per_sec
        self.retention_days = retention_days
        self.tick_sec = tick_sec
        #: Per recovered model, when (database clock) it was seen recovered.
        self.recovered_at: dict[str, datetime] = {}
        self.replayed = 0
        self._conn: asyncpg.Connection | None = None
        # The next moment a replay statement may run: one clock for all models, so that
        # the pace holds fleet-wide whatever number of models recover together.
        self._next_at = 0.0
        self._batch = max(1, math.ceil(replay_per_sec * _MIN_STEP_SEC))
        # 2% above batch/pace: the upstream requests start a few ms after the claims, and
        # that jitter must not squeeze one batch too many into some second.
        self._step = self._batch / replay_per_sec * 1.02
        # Woken by every shared-state change, so that a recovery's moment is taken within
        # milliseconds: a job that dies after it (the provider answers probes but fails
        # this job) is not replayed by this recovery. The view has no unsubscribe; a term
        # ends rarely, and an ended replayer ignores the calls.
        self._wake = asyncio.Event()
        self._active = True
        view.subscribe(self._on_row)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self.dsn, timeout=5, command_timeout=10,
                server_settings={"application_name": "bulwark-dlq"})
        return self._conn

    def _on_row(self, _row: object) -> None:
        if self._active:
            self._wake.set()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 0.5)
            except _CLOSE_ERRORS:
                conn.terminate()

    async def run(self) -> None:
        next_prune = time.monotonic() + min(self.tick_sec, 5.0)
        try:
            while True:
                try:
                    await self.step()
                    if time.monotonic() >= next_prune:
                        await self.prune()
                        next_prune = time.monotonic() + PRUNE_EVERY_SEC
                except DB_ERRORS as err:
                    log.warning("dlq: database unreachable (%s); will retry",
                                type(err).__name__)
                    await self.close()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.tick_sec):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            self._active = False
            await self.close()

    async def step(self) -> None:
        """Note recoveries, then replay every recovered model's dead jobs, paced."""
        models = recovered_models(self.view, self.providers)
        for gone in set(self.recovered_at) - models:
            del self.recovered_at[gone]
        fresh = models - set(self.recovered_at)
        if fresh:
            conn = await self._connection()
            now = await conn.fetchval("SELECT now()")
            for model in fresh:
                self.recovered_at[model] = now
        for model, since in list(self.recovered_at.items()):
            await self._replay_model(model, since)

    async def _replay_model(self, model: str, since: datetime) -> None:
        """Replay a batch, wait until workers have claimed it, then leave `step` before the
        next: the interval is measured from the claims (when upstream requests start),
        not from the replays, so that workers picking jobs up late cannot bunch them."""
        loop = asyncio.get_running_loop()
        pending: list[str] = []
        waiting_since = loop.time()
        while model in self.recovered_at:
            conn = await self._connection()
            if pending:
                ago = await jobstore.claimed_ago(conn, pending)
                if ago is None:
                    if loop.time() - waiting_since > self.tick_sec:
                        return  # not taken (workers busy or unable): look again later
                    await asyncio.sleep(min(self._step, _MIN_STEP_SEC))
                    continue
                pending = []
                self._next_at = max(self._next_at, loop.time() + self._step - ago)
            delay = self._next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if model not in recovered_models(self.view, self.providers):
                self.recovered_at.pop(model, None)
                return
            pending = await jobstore.replay_dead(conn, model=model, died_before=since,
                                                 limit=self._batch)
            if not pending:
                return  # nothing left (or an earlier replay still unclaimed)
            waiting_since = loop.time()
            self._next_at = loop.time() + self._step
            self.replayed += len(pending)
            log.info("dlq: replayed %d dead jobs", len(pending), extra={"model": model})

    async def prune(self) -> None:
        conn = await self._connection()
        deleted = await jobstore.prune(conn, keep_days=self.retention_days)
        log.info("jobs retention: pruned", extra={"deleted": sum(deleted.values())})
