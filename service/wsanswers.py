"""Answers of WebSocket chat requests, kept whole so that `resume` on any web process can
deliver them (docs/WEBSOCKET.md "Resume").

An answer's key is (scope, client id); the scope is a hash of the socket's session token.
Locally, a running answer has a list of waiters (sockets that resumed it), and a finished
one stays in a small bounded cache, so a resume on the same process costs nothing.

Postgres (`ws_answers`, migration 0005) is for the other processes. Nothing here is on the
chat path: `begin` and `finish` only record the latest state per key, and one background
task writes the batch (one upsert) every FLUSH_SEC, NOTIFYing `ws_answers` with
"<scope>:<id>" for each finished answer in the same transaction. A process serving a
resume of an answer running elsewhere waits for that NOTIFY (registering before it asks, so
the NOTIFY cannot slip between its query and its wait). The running process renews a lease
on its running rows; a lease that lapses means the process died (kill -9) and the answer is
reported lost — never generated a second time behind the client's back.

`resume` of answers not in this process is the one round trip: one SELECT per resume
frame, on the resume path only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from bulwark.bus import Bus
from bulwark.errors import GatewayError, NotFound, ServiceUnavailable
from bulwark.wire import Chunk, ChunkChoice, Delta, ToolCall, ToolCallFunction, Usage, encoder
from service import wsproto

if TYPE_CHECKING:
    from asyncpg import Record
    from asyncpg.pool import PoolConnectionProxy

    _Conn = PoolConnectionProxy[Record]

log = logging.getLogger("bulwark.ws")

CHANNEL = "ws_answers"
#: Batch window of the writer: an answer finished here reaches a resume waiting on another
#: process within this (plus the NOTIFY's trip), and one upsert carries the whole batch.
FLUSH_SEC = 0.05
#: A running row's lease, renewed every RENEW_SEC while it runs: a resume elsewhere reports
#: the answer lost at most LEASE_SEC after its process died.
LEASE_SEC = 3.0
RENEW_SEC = 1.0
PRUNE_SEC = 60.0
#: Unwritten states held while Postgres is slow or down; past it the oldest are dropped.
MAX_PENDING = 20_000
#: Finished answers kept in memory for a resume on this process.
RECENT_MAX = 10_000
#: An id not (yet) in the table is looked for once more after this: its running row may be
#: in its process's next batch (an ack is sent before the row is written, never after a
#: round trip), and a client that reconnects at once must not be told "unknown".
UNKNOWN_GRACE_SEC = 0.5

Key = tuple[str, str]


def scope_of(session: str) -> str:
    """What a session token is stored as: a hash, so the table cannot be used to resume."""
    return hashlib.sha256(session.encode()).hexdigest()[:32]


class Finished(NamedTuple):
    """A whole answer as resume delivers it: a delta with the whole message and a done
    frame, or the error frame the client got."""

    chunk: bytes | None  # the whole answer as one chat.completion.chunk (JSON)
    provider: str
    attempts: int
    fallback: str
    usage: bytes | None
    error: bytes | None  # the OpenAI error object (JSON) when the answer failed

    def frames(self, cid: str) -> list[bytes]:
        if self.error is not None:
            return [b'{"type":"error","id":' + wsproto.encode_json(cid) + b',"error":'
                    + self.error + b"}"]
        assert self.chunk is not None
        return [wsproto.delta_prefix(cid) + self.chunk + b"}",
                wsproto.done(cid, self.provider, self.attempts, self.fallback, self.usage)]

    @classmethod
    def failed(cls, err: GatewayError) -> Finished:
        return cls(None, "", 0, "none", None, wsproto.encode_json(err.body()["error"]))


Outcome = Finished | GatewayError
Waiter = Callable[[Outcome], None]


class _Choice:
    __slots__ = ("finish", "refusal", "text", "tools")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, tuple[ToolCall, list[str]]] = {}
        self.finish: str | None = None


class Whole:
    """The answer of a stream, put together from its chunks as they pass (content and
    refusal concatenated, tool calls merged by index, the last finish_reason and usage)."""

    __slots__ = ("choices", "head", "usage")

    def __init__(self) -> None:
        self.head: Chunk | None = None
        self.choices: dict[int, _Choice] = {}
        self.usage: Usage | None = None

    def add(self, chunk: Chunk) -> None:
        if self.head is None:
            self.head = chunk
        if chunk.usage is not None:
            self.usage = chunk.usage
        for c in chunk.choices:
            ch = self.choices.get(c.index)
            if ch is None:
                ch = self.choices[c.index] = _Choice()
            d = c.delta
            if d.content:
                ch.text.append(d.content)
            if d.tool_calls:
                self._tools(ch, d.tool_calls)
            if d.refusal:
                ch.refusal.append(d.refusal)
            if c.finish_reason:
                ch.finish = c.finish_reason

    @staticmethod
    def _tools(ch: _Choice, calls: list[ToolCall]) -> None:
        for n, call in enumerate(calls):
            index = call.index if isinstance(call.index, int) else n
            have = ch.tools.get(index)
            if have is None:
                fn = ToolCallFunction(name=call.function.name)
                have = ch.tools[index] = (ToolCall(id=call.id, type=call.type, function=fn,
                                                   index=index), [])
            if isinstance(call.function.arguments, str):
                have[1].append(call.function.arguments)

    def chunk_json(self) -> bytes:
        head = self.head
        choices = []
        for index in sorted(self.choices):
            ch = self.choices[index]
            delta = Delta(role="assistant", content="".join(ch.text))
            if ch.refusal:
                delta.refusal = "".join(ch.refusal)
            if ch.tools:
                calls = []
                for i in sorted(ch.tools):
                    call, args = ch.tools[i]
                    call.function.arguments = "".join(args)
                    calls.append(call)
                delta.tool_calls = calls
            choices.append(ChunkChoice(index=index, delta=delta, finish_reason=ch.finish))
        chunk = Chunk(id=head.id if head else "", created=head.created if head else 0,
                      model=head.model if head else "", choices=choices, usage=self.usage)
        if head is not None:
            chunk.system_fingerprint = head.system_fingerprint
        return encoder.encode(chunk)


class _Write(NamedTuple):
    status: str  # running | done | failed
    fin: Finished | None


_UPSERT = """
WITH w AS (
    INSERT INTO ws_answers AS a (scope, id, status, owner, lease_until, chunk, provider,
                                 attempts, fallback, usage, error, updated_at, expires_at)
    SELECT s, i, st, $10::text, now() + make_interval(secs => $11::float8), c::jsonb, p, n, f,
           us::jsonb, e::jsonb, now(), now() + make_interval(secs => $12::float8)
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[],
                $7::text[], $8::text[], $9::text[]) AS x(s, i, st, c, p, n, f, us, e)
    ON CONFLICT (scope, id) DO UPDATE SET
        status = excluded.status, owner = excluded.owner, lease_until = excluded.lease_until,
        chunk = excluded.chunk, provider = excluded.provider, attempts = excluded.attempts,
        fallback = excluded.fallback, usage = excluded.usage, error = excluded.error,
        updated_at = now(), expires_at = excluded.expires_at
    RETURNING a.scope, a.id, a.status
)
SELECT count(pg_notify('ws_answers', w.scope || ':' || w.id)) FROM w WHERE w.status <> 'running'
"""

_FETCH = """
SELECT a.scope, a.id, a.status, a.owner, a.chunk::text AS chunk, a.provider, a.attempts,
       a.fallback, a.usage::text AS usage, a.error::text AS error,
       greatest(0, extract(epoch FROM a.lease_until - now()))::float8 AS lease_left
FROM ws_answers a
JOIN unnest($1::text[], $2::text[]) AS k(s, i) ON a.scope = k.s AND a.id = k.i
WHERE a.expires_at > now()
"""

_RENEW = """
UPDATE ws_answers SET lease_until = now() + make_interval(secs => $2::float8)
WHERE owner = $1 AND status = 'running'
"""

_PRUNE = "DELETE FROM ws_answers WHERE expires_at < now()"


def _unknown() -> GatewayError:
    return NotFound("No answer with this id in this session (never sent here, or past its "
                    "retention).", code="unknown_id", param="ids")


def _lost() -> GatewayError:
    return ServiceUnavailable("The web process running this answer stopped before it "
                              "finished; send the request again.", code="answer_lost",
                              should_retry=True)


def _unavailable() -> GatewayError:
    return ServiceUnavailable("Stored answers cannot be read right now; resume again shortly.",
                              code="resume_unavailable", retry_after=1.0, should_retry=True)


class AnswerStore:
    def __init__(self, owner: str, *, retention_sec: float) -> None:
        self.owner = owner
        self.retention_sec = retention_sec
        self._bus: Bus | None = None
        self._running: dict[Key, list[Waiter]] = {}
        self._recent: collections.OrderedDict[Key, tuple[Finished, float]] = (
            collections.OrderedDict())
        self._pending: dict[Key, _Write] = {}
        self._remote: dict[Key, list[Waiter]] = {}
        self._recheck: set[Key] = set()
        self._graced: set[Key] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self.dropped = 0

    # -- wiring ---------------------------------------------------------------------

    def listen(self, bus: Bus) -> None:
        """Use `bus` for rows and NOTIFY; call before bus.start()."""
        self._bus = bus
        bus.listen(CHANNEL, self._on_notify, on_resync=self._on_resync)

    def _on_notify(self, payload: str) -> None:
        # In the bus task: a dict lookup and an enqueue, nothing more.
        scope, _, cid = payload.partition(":")
        key = (scope, cid)
        if key in self._remote:
            self._recheck.add(key)
            self._wake.set()

    def _on_resync(self) -> None:
        # NOTIFYs sent while the listener was away are gone: ask again about every wait.
        if self._remote:
            self._recheck.update(self._remote)
            self._wake.set()

    # -- the answers of this process ------------------------------------------------

    def begin(self, key: Key) -> None:
        self._running.setdefault(key, [])
        self._recent.pop(key, None)
        self._put(key, _Write("running", None))

    def finish(self, key: Key, fin: Finished) -> None:
        waiters = self._running.pop(key, ())
        self._recent[key] = (fin, time.monotonic() + self.retention_sec)
        if len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)
        self._put(key, _Write("failed" if fin.error is not None else "done", fin))
        for waiter in waiters:
            waiter(fin)

    def running(self) -> int:
        return len(self._running)

    def _put(self, key: Key, write: _Write) -> None:
        if self._bus is None:
            return
        self._pending.pop(key, None)  # re-insert: the dict's order is the age of the state
        self._pending[key] = write
        if len(self._pending) > MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
            self.dropped += 1
        self._wake.set()

    def _recent_get(self, key: Key) -> Finished | None:
        hit = self._recent.get(key)
        if hit is None:
            return None
        if hit[1] < time.monotonic():
            del self._recent[key]
            return None
        return hit[0]

    # -- resume ---------------------------------------------------------------------

    async def resume(self, scope: str, ids: Sequence[str],
                     deliver: Callable[[str, Outcome], None]) -> None:
        """Deliver each id's answer through `deliver` once: now when it is finished, when
        it finishes when it is running (here or on another process), or an error."""
        elsewhere: list[Key] = []
        for cid in ids:
            key = (scope, cid)
            waiters = self._running.get(key)
            if waiters is not None:
                waiters.append(partial(deliver, cid))
            elif (fin := self._recent_get(key)) is not None:
                deliver(cid, fin)
            else:
                elsewhere.append(key)
        if not elsewhere:
            return
        if self._bus is None:
            for _, cid in elsewhere:
                deliver(cid, _unknown())
            return
        for key in elsewhere:
            self._remote.setdefault(key, []).append(partial(deliver, key[1]))
        rows = await self._fetch(elsewhere)
        if rows is None:
            for key in elsewhere:
                self._settle(key, _unavailable())
            return
        for key in elsewhere:
            self._judge(key, rows.get(key))

    def _settle(self, key: Key, outcome: Outcome) -> None:
        for waiter in self._remote.pop(key, ()):
            waiter(outcome)

    def _judge(self, key: Key, row: Record | None) -> None:
        if key not in self._remote:
            return  # delivered meanwhile (a NOTIFY's recheck got there first)
        if row is None:
            if key in self._graced:
                self._graced.discard(key)
                self._settle(key, _unknown())
            else:
                self._graced.add(key)
                asyncio.get_running_loop().call_later(UNKNOWN_GRACE_SEC, self._recheck_later,
                                                      key)
            return
        self._graced.discard(key)
        if row["status"] == "done":
            self._settle(key, Finished(row["chunk"].encode(), row["provider"] or "",
                                       row["attempts"] or 0, row["fallback"] or "none",
                                       None if row["usage"] is None else row["usage"].encode(),
                                       None))
        elif row["status"] == "failed":
            self._settle(key, Finished(None, "", 0, "none", None, row["error"].encode()))
        elif row["lease_left"] <= 0 or row["owner"] == self.owner:
            # Ours but no longer running here, or its process stopped renewing: it died.
            self._settle(key, _lost())
        else:
            # Running elsewhere: its NOTIFY delivers it; look again when the lease would
            # lapse, in case its process dies without finishing.
            loop = asyncio.get_running_loop()
            loop.call_later(row["lease_left"] + 0.05, self._recheck_later, key)

    def _recheck_later(self, key: Key) -> None:
        if key in self._remote:
            self._recheck.add(key)
            self._wake.set()

    async def _fetch(self, keys: Sequence[Key]) -> dict[Key, Record] | None:
        assert self._bus is not None

        async def op(conn: _Conn) -> list[Record]:
            return await conn.fetch(_FETCH, [k[0] for k in keys], [k[1] for k in keys])

        rows = await self._bus.write("ws resume", op)
        if rows is None:
            return None
        return {(r["scope"], r["id"]): r for r in rows}

    # -- the background task -------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_renew = next_prune = loop.time()
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RENEW_SEC):
                    await self._wake.wait()
            self._wake.clear()
            if self._pending:
                if not self._stopping:
                    await asyncio.sleep(FLUSH_SEC)  # let the batch fill
                await self.flush()
            if self._recheck:
                keys, self._recheck = list(self._recheck), set()
                rows = await self._fetch(keys)
                if rows is None:
                    self._recheck.update(keys)  # the database is away; on_resync retries
                else:
                    for key in keys:
                        self._judge(key, rows.get(key))
            now = loop.time()
            if self._running and now >= next_renew and self._bus is not None:
                next_renew = now + RENEW_SEC
                await self._bus.write("ws lease", partial(_renew, owner=self.owner))
            if now >= next_prune and self._bus is not None:
                next_prune = now + PRUNE_SEC
                await self._bus.write("ws prune", _prune)

    def stop(self) -> None:
        """End run() after its current step (never mid-write: a batch is not lost)."""
        self._stopping = True
        self._wake.set()

    async def flush(self) -> None:
        if self._bus is None or not self._pending:
            return
        batch, self._pending = self._pending, {}
        cols: list[list[object]] = [[] for _ in range(9)]
        for (scope, cid), w in batch.items():
            fin = w.fin
            row = (scope, cid, w.status,
                   None if fin is None or fin.chunk is None else fin.chunk.decode(),
                   None if fin is None else fin.provider,
                   None if fin is None else fin.attempts,
                   None if fin is None else fin.fallback,
                   None if fin is None or fin.usage is None else fin.usage.decode(),
                   None if fin is None or fin.error is None else fin.error.decode())
            for col, value in zip(cols, row, strict=True):
                col.append(value)

        async def op(conn: _Conn) -> object:
            return await conn.fetchval(_UPSERT, *cols, self.owner, LEASE_SEC,
                                       self.retention_sec)

        if await self._bus.write("ws answers", op) is None:
            self.dropped += len(batch)


async def _renew(conn: _Conn, *, owner: str) -> str:
    return await conn.execute(_RENEW, owner, LEASE_SEC)


async def _prune(conn: _Conn) -> str:
    return await conn.execute(_PRUNE)

