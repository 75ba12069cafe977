"""`Idempotency-Key` on `POST /v1/chat/completions` and `POST /v1/chat/jobs`, fleet-wide.

A request without the header never reaches this module (the routes test for the header
first): no cost at all on the usual path. With it, one Postgres round trip decides, before
any upstream call, in a single statement on `idempotency_keys`:

- the key is new (or its 24 hours are over, or its first request was abandoned by a dead
  process — same body only): this request claims it and runs;
- the key's first request has finished with the same body: its stored response is
  replayed, with `Idempotent-Replayed: true`, and no upstream call;
- it is still running: 409 `idempotency_key_in_use` with `Retry-After`;
- the body differs (method, path and body are hashed): 422 `idempotency_key_reused`.

The response is stored in the background once decided (the client does not wait for that
write; a retry arriving in between gets the 409 for a moment). Stored: 2xx answers and the
caller's own errors (4xx but 408, 409, 429), which the same request would meet again. Not
stored, and the key released for a fresh try: the gateway's transient failures (429, 5xx),
a client that hung up, and streams that did not complete.

A stream request with a key is streamed live; the events are recorded as they are written
(`keys.IDEMPOTENCY_RECORD`, read by the SSE sink), and a complete stream (ending in
`data: [DONE]`) is stored and replayed as the same stream, all events in one response.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

import asyncpg
import msgspec
from aiohttp import web

from bulwark.errors import (
    Conflict,
    GatewayError,
    InvalidRequest,
    ServiceUnavailable,
    Unprocessable,
)
from bulwark.jobstore import DB_ERRORS, IDEMPOTENCY_TTL_SEC, Conn
from bulwark.wire import encoder
from service.sync import process_name

log = logging.getLogger("bulwark.idempotency")

HEADER: Final = "Idempotency-Key"
REPLAYED: Final = "Idempotent-Replayed"
MAX_KEY_CHARS: Final = 255
#: Larger answers are not kept (a retry then runs again): bounds the table's rows.
MAX_STORED_BYTES: Final = 1 << 20
#: Headers of a response that are this response's, not the answer's.
_NOT_STORED: Final = frozenset({"x-request-id", "content-length", "date", "server",
                                "transfer-encoding", "connection"})
_NOT_STORED_STATUSES: Final = frozenset({408, 409, 429})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CLAIM: Final = """
WITH ins AS (
    INSERT INTO idempotency_keys AS k
        (scope, key, body_hash, state, owner, locked_until, created_at)
    VALUES ($1, $2, $3, 'running', $4, now() + make_interval(secs => $5), now())
    ON CONFLICT (scope, key) DO UPDATE SET
        body_hash = excluded.body_hash, state = 'running', owner = excluded.owner,
        locked_until = excluded.locked_until, created_at = now(),
        status = NULL, headers = NULL, body = NULL
    WHERE k.created_at < now() - make_interval(secs => $6)
       OR (k.state = 'running' AND k.locked_until < now() AND k.body_hash = excluded.body_hash)
    RETURNING true
)
SELECT true AS mine, NULL::bytea AS body_hash, NULL::text AS state, NULL::int AS status,
    NULL::text AS headers, NULL::bytea AS body, NULL::float8 AS wait
FROM ins
UNION ALL
SELECT false, k.body_hash, k.state, k.status, k.headers::text, k.body,
    extract(epoch FROM k.locked_until - now())::float8
FROM idempotency_keys k
WHERE k.scope = $1 AND k.key = $2 AND NOT EXISTS (SELECT 1 FROM ins)
"""
_STORE: Final = """
UPDATE idempotency_keys SET state = 'done', status = $4, headers = $5::text::jsonb, body = $6,
    locked_until = now()
WHERE scope = $1 AND key = $2 AND owner = $3
"""
_RELEASE: Final = """
DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND owner = $3 AND state = 'running'
"""

_headers_decoder = msgspec.json.Decoder(dict[str, str])


class Slot(NamedTuple):
    """One claim of a key: the owner is unique per claim, so that a late write of an
    abandoned claim cannot overwrite the claim that replaced it."""

    scope: str
    key: str
    owner: str


class Claim(msgspec.Struct, frozen=True):
    mine: bool
    body_hash: bytes | None = None
    state: str | None = None
    status: int | None = None
    headers: str | None = None
    body: bytes | None = None
    wait: float | None = None


class IdempotencyStore:
    """Claims, stores and releases keys on the jobs pool; writes after the response go
    through owned background tasks, awaited (briefly) at shutdown."""

    def __init__(self, pool: asyncpg.Pool, *, lease_sec: float) -> None:
        self.pool = pool
        #: A running claim older than this belonged to a process that died.
        self.lease_sec = lease_sec
        self._pending: set[asyncio.Task[None]] = set()
        self._proc = process_name()

    def new_owner(self) -> str:
        return f"{self._proc}:{secrets.token_hex(4)}"

    async def claim(self, scope: str, key: str, body_hash: bytes, owner: str) -> Claim:
        conn: Conn = self.pool
        # Twice at most: a row another process inserted after this statement's snapshot is
        # invisible to its SELECT (READ COMMITTED), yet made our INSERT do nothing.
        for _ in range(3):
            try:
                rec = await conn.fetchrow(_CLAIM, scope, key, body_hash, owner, self.lease_sec,
                                          IDEMPOTENCY_TTL_SEC)
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
                rec = await conn.fetchrow(_CLAIM, scope, key, body_hash, owner, self.lease_sec,
                                          IDEMPOTENCY_TTL_SEC)
            if rec is not None:
                return Claim(rec["mine"], rec["body_hash"], rec["state"], rec["status"],
                             rec["headers"], rec["body"], rec["wait"])
        raise asyncpg.PostgresError("idempotency claim found no row three times")

    def store_later(self, slot: Slot, status: int, headers: dict[str, str],
                    body: bytes) -> None:
        self._later("store", self.pool.execute(_STORE, *slot, status,
                                               encoder.encode(headers).decode(), body))

    def release_later(self, slot: Slot) -> None:
        self._later("release", self.pool.execute(_RELEASE, *slot))

    def _later(self, what: str, op: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await op
            except DB_ERRORS as err:
                # The claim then expires with its lease: a retry after that runs again.
                log.warning("idempotency %s failed: %s", what, type(err).__name__)

        task = asyncio.create_task(run(), name=f"idempotency {what}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=1.0)


def _check_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_KEY_CHARS or not (key.isascii() and key.isprintable()):
        raise InvalidRequest(
            f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters.",
            code="invalid_idempotency_key", param=HEADER)


def _stored_headers(resp: web.StreamResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _NOT_STORED}


async def idempotent(request: web.Request, handler: Handler, store: IdempotencyStore | None,
                     record_key: web.RequestKey[list[bytes]], *, scope: str = "") -> (
        web.StreamResponse):
    """Run `handler` at most once per key (see the module docstring). `scope` will be the
    client key's id once keys exist, so that two clients' keys never collide."""
    key = request.headers[HEADER]
    _check_key(key)
    if store is None:
        raise ServiceUnavailable(
            f"This gateway runs without a database: {HEADER} cannot be honoured.",
            code="idempotency_unavailable", should_retry=False)
    body = await request.read()
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode() + body).digest()
    owner = store.new_owner()
    try:
        claim = await store.claim(scope, key, digest, owner)
    except DB_ERRORS as err:
        log.warning("idempotency claim failed: %s", type(err).__name__)
        raise ServiceUnavailable(f"{HEADER} cannot be checked right now; retry after the "
                                 "delay given.", code="idempotency_unavailable",
                                 retry_after=1.0, should_retry=True) from None
    if not claim.mine:
        return _replay_or_refuse(claim, digest)

    slot = Slot(scope, key, owner)
    record: list[bytes] = []
    request[record_key] = record
    try:
        resp = await handler(request)
    except GatewayError as err:
        if err.status < 500 and err.status not in _NOT_STORED_STATUSES:
            headers = {**err.headers(), "Content-Type": "application/json"}
            store.store_later(slot, err.status, headers, encoder.encode(err.body()))
        else:
            store.release_later(slot)
        raise
    except BaseException:
        store.release_later(slot)
        raise
    if resp.prepared:
        # A stream, already sent: keep it only if it completed.
        sent = b"".join(record)
        if sent.endswith(b"data: [DONE]\n\n") and len(sent) <= MAX_STORED_BYTES:
            store.store_later(slot, resp.status, _stored_headers(resp), sent)
        else:
            store.release_later(slot)
        return resp
    assert isinstance(resp, web.Response)
    raw = resp.body
    if (isinstance(raw, bytes) and len(raw) <= MAX_STORED_BYTES and resp.status < 500
            and resp.status not in _NOT_STORED_STATUSES):
        store.store_later(slot, resp.status, _stored_headers(resp), raw)
    else:
        store.release_later(slot)
    return resp


def _replay_or_refuse(claim: Claim, digest: bytes) -> web.Response:
    if claim.body_hash != digest:
        raise Unprocessable(
            f"This {HEADER} was already used with a different request; use a new key.",
            code="idempotency_key_reused", param=HEADER, should_retry=False)
    if claim.state != "done" or claim.status is None:
        raise Conflict(f"A request with this {HEADER} is still running; retry after the "
                       "delay given.", code="idempotency_key_in_use", retry_after=1.0)
    headers = _headers_decoder.decode(claim.headers or "{}")
    headers[REPLAYED] = "true"
    return web.Response(status=claim.status, body=claim.body or b"", headers=headers)
