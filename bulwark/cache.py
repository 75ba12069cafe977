"""The response cache: a stored answer to the very same request, for when nothing live can
answer (`cache = "fallback"`, RFC 5861 stale-if-error) or before asking anyone (`"first"`).

- **Key**: sha256 over a canonical encoding of the model and every parameter that changes
  the answer (`cache_key`); `stream`, `stream_options` and fields that only label a request
  (`user`, `metadata`, `store`, …) are left out, so a streamed and a plain request share
  one answer. `scope` is the client-key slot: empty today, a key id once per-key caching
  lands, so that one tenant never sees another's answers.
- **Where**: Postgres (`response_cache`, schema/migrations/0003_cache.sql) so that every
  process and host shares it, behind a bounded in-process LRU. Writes leave the request
  path: `remember()` only puts the answer in the LRU and a bounded pending batch that one
  owned task (`run`) inserts every `FLUSH_SEC`, like the error rows.
- **Reads**: `lookup()` tries the LRU, then Postgres under a short timeout
  (`lookup_timeout`). In `fallback` mode that read happens only when nothing live could
  answer, i.e. on the failure path; in `first` mode on every LRU miss (docs/PERFORMANCE.md
  measures it). A timeout or an unreachable database is a miss, never an error.
- **Bounds**: an answer larger than `max_entry_bytes` is not stored; the LRU holds at most
  `memory_bytes` of answers; the pending batch at most `MAX_PENDING` answers (the oldest
  go first); `prune()` (healthd's hourly retention) deletes rows older than the retention
  and the oldest beyond `store_max_bytes`.
- **Two forms**: a whole answer is stored as the chat.completion the client got
  (`completion`); a finished stream as its chunks, one JSON text each separated by RS
  (0x1E, RFC 7464), as they were sent (`chunks`) — joining them costs ~1 µs, assembling
  them into a completion ~30 µs, so assembly happens when a stored stream is served
  (bulwark/replay.py `stored_completion`), on the rare path.
- **What is never stored**: errors, an answer that did not complete, an answer to a request
  that said `Cache-Control: no-store` — the dispatcher only calls `remember()` for a whole,
  successful answer that may be stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import asyncpg
import msgspec

from bulwark.bus import CONNECTION_ERRORS
from bulwark.wire import ChatRequest

log = logging.getLogger("bulwark.cache")

#: Fields that label or deliver a request but do not change the answer.
_NOT_IN_KEY = {
    "stream": False, "stream_options": msgspec.UNSET, "user": msgspec.UNSET,
    "metadata": msgspec.UNSET, "store": msgspec.UNSET, "safety_identifier": msgspec.UNSET,
    "prompt_cache_key": msgspec.UNSET,
}
#: Sorted keys everywhere (struct fields and dicts: tools, response_format, logit_bias), so
#: that two encodings of the same request are the same bytes.
_canonical = msgspec.json.Encoder(order="sorted")

#: Pending answers flushed this often: a stored answer is shared fleet-wide within ~a second.
FLUSH_SEC = 0.5
#: Answers waiting for the writer; past this the oldest are dropped (and counted) rather
#: than memory growing while Postgres is slow or down.
MAX_PENDING = 5_000
#: One process rewrites the same key at most this often: a hot request answered a thousand
#: times a minute costs one row write a minute, not a thousand (the LRU still takes the
#: newest answer). The stored row is then at most this much older than the newest answer.
REWRITE_SEC = 60.0
#: A write batch (one statement) must not hold the writer for long.
WRITE_TIMEOUT_SEC = 5.0
#: Connections of the cache's own pool: one for the writer, the rest for lookups, so that
#: a lookup never queues behind a slow batch. Separate from the bus's small write pool.
POOL_MAX = 4

_SELECT = """
SELECT body, form, greatest(0, extract(epoch FROM now() - created_at))::float8 AS age
FROM response_cache
WHERE key = $1 AND created_at > now() - make_interval(secs => $2::float8)
"""
# created_at from the database clock minus how long the answer waited in this process:
# no host's wall clock is trusted. Duplicate keys are removed from a batch before this.
_UPSERT = """
INSERT INTO response_cache AS c (key, model, body, form, size, created_at)
SELECT k, m, b, f, octet_length(b), now() - make_interval(secs => w)
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::float8[]) AS t(k, m, b, f, w)
ON CONFLICT (key) DO UPDATE SET
    model = excluded.model, body = excluded.body, form = excluded.form, size = excluded.size,
    created_at = excluded.created_at
"""
_PRUNE_AGE = ("DELETE FROM response_cache"
              " WHERE created_at < now() - make_interval(secs => $1::float8)")
# The newest rows up to max_bytes stay; everything older than that goes.
_PRUNE_SIZE = """
DELETE FROM response_cache WHERE key IN (
    SELECT key FROM (
        SELECT key, sum(size) OVER (ORDER BY created_at DESC, key) AS upto
        FROM response_cache) AS t
    WHERE upto > $1::bigint)
"""

_DB_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
_WRITE_ERRORS: tuple[type[Exception], ...] = (TimeoutError, *_DB_ERRORS)


async def _no_reset(conn: asyncpg.Connection) -> None:
    """The pool's default reset (UNLISTEN, RESET ALL, advisory unlock, CLOSE ALL) is one
    more round trip per lookup; these connections only run the two statements above, which
    leave no session state behind."""


def cache_key(chat: ChatRequest, scope: str = "") -> str:
    """The exact-match key of a request's answer (hex sha256).

    `scope` isolates tenants (a client key id once per-key caching exists)."""
    canonical = _canonical.encode(msgspec.structs.replace(chat, **_NOT_IN_KEY))
    # One buffer, one update: this runs for every answer stored (fallback mode).
    return hashlib.sha256(b"%s\0%s" % (scope.encode(), canonical)).hexdigest()


class CacheControl(NamedTuple):
    no_store: bool
    no_cache: bool


NO_DIRECTIVES = CacheControl(False, False)


def parse_cache_control(value: str | None) -> CacheControl:
    """The request directives we honour: `no-store` (keep the answer out) and `no-cache`
    (refuse a stored one). Unknown directives and arguments are ignored, as RFC 9111 says."""
    if not value:
        return NO_DIRECTIVES
    names = {d.split("=", 1)[0].strip().lower() for d in value.split(",")}
    return CacheControl("no-store" in names, "no-cache" in names)


Form = Literal["completion", "chunks"]
#: Separates a stored stream's chunks: a control character never appears raw in JSON.
RS = b"\x1e"


class Hit(NamedTuple):
    body: bytes
    age: float  # seconds since it was answered
    form: Form = "completion"


class _Pending(NamedTuple):
    model: str
    body: bytes
    at: float  # monotonic
    form: Form


class _Executor(Protocol):
    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str: ...


class ResponseCache:
    """The LRU, the pending batch and the Postgres store of one process.

    Without a DSN it is an in-process cache only (a single process without a database).
    Single-threaded: the request path and the writer run on one event loop.
    """

    def __init__(self, dsn: str | None, *, max_entry_bytes: int = 256 * 1024,
                 memory_bytes: int = 32 * 1024 * 1024, lookup_timeout: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dsn = dsn
        self.max_entry_bytes = max_entry_bytes
        self.memory_bytes = memory_bytes
        self.lookup_timeout = lookup_timeout
        self._clock = clock
        #: key -> (body, answered at, form, last queued for Postgres at; all monotonic).
        self._lru: OrderedDict[str, tuple[bytes, float, Form, float]] = OrderedDict()
        self._bytes = 0
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False
        # Counters (attributes, read by telemetry); monotonic, never reset.
        self.hits_memory = 0
        self.hits_db = 0
        self.misses = 0
        self.lookup_timeouts = 0
        self.lookup_errors = 0
        self.stored = 0
        self.too_large = 0
        self.dropped = 0
        self.rows_written = 0
        self.write_failures = 0

    @property
    def hits(self) -> int:
        return self.hits_memory + self.hits_db

    @property
    def memory_used(self) -> int:
        return self._bytes

    # -- the request path ------------------------------------------------------------

    def remember(self, key: str, model: str, body: bytes, form: Form = "completion") -> None:
        """Keep a whole, successful answer (never blocks, never raises)."""
        size = len(body)
        if size > self.max_entry_bytes:
            self.too_large += 1
            return
        now = self._clock()
        old = self._lru.get(key)
        write = self._dsn is not None and (old is None or now - old[3] >= REWRITE_SEC)
        self._put(key, body, now, form, now if write or old is None else old[3])
        self.stored += 1
        if not write:
            return
        pending = self._pending
        pending.pop(key, None)
        pending[key] = _Pending(model, body, now, form)
        if len(pending) > MAX_PENDING:
            pending.popitem(last=False)
            self.dropped += 1

    def recent(self, key: str, max_age: float) -> Hit | None:
        """The LRU's answer no older than max_age (no I/O)."""
        entry = self._lru.get(key)
        if entry is None:
            return None
        age = self._clock() - entry[1]
        if age > max_age:
            return None
        self._lru.move_to_end(key)
        self.hits_memory += 1
        return Hit(entry[0], age, entry[2])

    async def lookup(self, key: str, max_age: float) -> Hit | None:
        """The LRU, then Postgres within `lookup_timeout`; None on a miss, a timeout or an
        unreachable database (counted)."""
        hit = self.recent(key, max_age)
        if hit is not None:
            return hit
        if self._dsn is None or self._closed:
            self.misses += 1
            return None
        try:
            async with asyncio.timeout(self.lookup_timeout):
                pool = await self._get_pool()
                row = await pool.fetchrow(_SELECT, key, max_age)
        except TimeoutError:
            self.lookup_timeouts += 1
            self.misses += 1
            return None
        except _DB_ERRORS as err:
            self.lookup_errors += 1
            self.misses += 1
            log.warning("cache lookup failed: %s", type(err).__name__)
            return None
        if row is None:
            self.misses += 1
            return None
        body, age = bytes(row["body"]), float(row["age"])
        form: Form = "chunks" if row["form"] == "chunks" else "completion"
        self.hits_db += 1
        if len(body) <= self.max_entry_bytes:
            at = self._clock() - age
            # Found in Postgres: as good as written then.
            self._put(key, body, at, form, at)
        return Hit(body, age, form)

    def _put(self, key: str, body: bytes, at: float, form: Form, written: float) -> None:
        lru = self._lru
        old = lru.pop(key, None)
        if old is not None:
            self._bytes -= len(old[0])
        lru[key] = (body, at, form, written)
        self._bytes += len(body)
        while self._bytes > self.memory_bytes:
            evicted = lru.popitem(last=False)[1][0]
            self._bytes -= len(evicted)

    # -- the writer (owned task) -----------------------------------------------------

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                assert self._dsn is not None
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=POOL_MAX, timeout=5.0, reset=_no_reset,
                    server_settings={"application_name": "bulwark-cache"})
            return self._pool

    async def run(self) -> None:
        """Owned task: open the pool early (a first lookup then finds a connection), and
        flush the pending batch every FLUSH_SEC."""
        with contextlib.suppress(*_DB_ERRORS):
            await self._get_pool()
        while True:
            await asyncio.sleep(FLUSH_SEC)
            await self.flush()

    async def flush(self) -> None:
        """Insert what is pending in one statement; on failure it is dropped and counted
        (a cache is best effort: the next answer to the same request is stored again)."""
        if not self._pending or self._dsn is None:
            return
        batch, self._pending = self._pending, OrderedDict()
        now = self._clock()
        keys = list(batch)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SEC):
                pool = await self._get_pool()
                items = batch.values()
                await pool.execute(_UPSERT, keys, [p.model for p in items],
                                   [p.body for p in items], [p.form for p in items],
                                   [max(0.0, now - p.at) for p in items])
        except _WRITE_ERRORS as err:
            self.write_failures += len(batch)
            for key in keys:
                entry = self._lru.get(key)
                if entry is not None:  # let the next answer to it try again
                    self._lru[key] = (*entry[:3], float("-inf"))
            log.warning("cache write of %d answers failed: %s", len(batch), type(err).__name__)
            return
        self.rows_written += len(batch)

    async def close(self) -> None:
        """Flush what is pending (bounded), then close the pool."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), 2.0)
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 2.0)
            except _WRITE_ERRORS:
                pool.terminate()


async def prune(conn: _Executor, *, max_age_sec: float, max_bytes: int) -> int:
    """Delete stored answers older than max_age_sec, then the oldest beyond max_bytes in
    total; returns the rows deleted. healthd runs it with its hourly retention."""
    deleted = 0
    for query, arg in ((_PRUNE_AGE, max_age_sec), (_PRUNE_SIZE, max_bytes)):
        status = await conn.execute(query, arg)
        deleted += int(status.rsplit(" ", 1)[-1])
    return deleted
