"""The operator API: breakers, degradation and client keys for the whole fleet.

Every action is written through the bus (fleet rows and provider rows in Postgres, with
NOTIFY), so it holds on every web process and in healthd within the bus's propagation
bound, whichever process took the call; each is recorded in `admin_audit` and logged.
Bearer `BULWARK_ADMIN_TOKEN`, compared in constant time; with none configured every call
is refused. Writes need Postgres: without one they answer 503 and say so.

The dead-letter queue and the reliability report live beside these (their own modules).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from aiohttp import web
from msgspec import Meta

from bulwark import clientkeys, forced, jobstore
from bulwark.audit import clean, record_action
from bulwark.bus import Bus, put_fleet_on
from bulwark.degradation import AUTO_KEY, OPERATOR_KEY, effective
from bulwark.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from bulwark.report import duration_sec, reliability_report
from bulwark.wire import encoder
from service.bodies import (
    AdminBreakerList,
    BreakerChanged,
    ClientKey,
    ClientKeyCreated,
    ClientKeyList,
    DegradationCleared,
    DegradationSet,
    DegradationState,
    DlqPage,
    DlqPurged,
    DlqRequeued,
    ReliabilityReport,
)
from service.inputs import decode_body, decode_query, invalid
from service.keys import BUS, GUARD, ROUTER, SETTINGS, VIEW
from service.openapi import describe

routes = web.RouteTableDef()

T = TypeVar("T")

#: What `source`/`updated_by` says for an operator's writes.
SOURCE = "admin"
#: The largest admin body we read: these are a few short fields.
MAX_BODY = 16 * 1024
#: Ten years: "no expiry" for expires_in_sec would be null; anything past this is a typo.
MAX_EXPIRY_SEC = 10 * 365 * 86_400.0
#: A page of dead jobs: enough to act on, bounded so that a huge DLQ is no huge answer.
DLQ_PAGE_MAX = 500

Level = Literal["normal", "minor", "moderate", "severe", "critical"]
Reason = Annotated[str, Meta(min_length=1, max_length=500)]
Expiry = Annotated[float, Meta(gt=0, le=MAX_EXPIRY_SEC)]


class ForceOpen(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Reason
    expires_in_sec: Expiry | None = None


class Reset(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(max_length=500)] = ""


class SetDegradation(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: Level
    reason: Reason
    expires_in_sec: Expiry | None = None


class WithReason(msgspec.Struct, frozen=True, kw_only=True):
    """The query of a DELETE: why, for the audit trail."""

    reason: Annotated[str, Meta(max_length=500)] = ""


class ReportQuery(msgspec.Struct, frozen=True, kw_only=True):
    #: The window: `24h`, `30m`, `7d`, `1w`, `90s` or plain seconds, up to 10 years.
    since: Annotated[str, Meta(pattern=r"^\s*\d+(\.\d+)?\s*[smhdw]?\s*$")] = "24h"


class DlqQuery(msgspec.Struct, frozen=True, kw_only=True):
    limit: Annotated[int, Meta(ge=1, le=DLQ_PAGE_MAX)] = 100
    #: Only dead jobs of this model.
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


_WRITE = ("x-bulwark-operator",)
_TAGS = ("admin",)


async def _body(request: web.Request, kind: type[T], *, from_query: bool = False) -> T:
    """The JSON body as `kind`; 400 naming the field when it does not fit."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"The body is larger than {MAX_BODY} bytes.")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"The body is larger than {MAX_BODY} bytes.")
    if raw.strip():
        # decode_body: a 400 naming the field, and `"rpm": 60.0` is 60 (JSON cannot tell).
        return decode_body(raw, msgspec.json.Decoder(kind))
    try:
        if from_query and request.query:
            return msgspec.convert(dict(request.query), kind, strict=False)
        # No body: the defaults, or a 400 naming the first required field.
        return msgspec.convert({}, kind)
    except msgspec.ValidationError as err:
        raise invalid(err) from None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def authorize(request: web.Request) -> None:
    """401 unless the request carries the admin token (constant-time comparison)."""
    token = request.app[SETTINGS].admin_token
    if not token:
        raise AuthenticationFailed(
            "The admin API is disabled: no BULWARK_ADMIN_TOKEN is configured.",
            code="admin_disabled")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Digests first: compare_digest on the raw values would leak the token's length.
    ok = hmac.compare_digest(_digest(presented.strip()), _digest(token))
    if scheme.lower() != "bearer" or not ok:
        raise AuthenticationFailed("Missing or wrong admin token.", code="invalid_admin_token")


def _who(request: web.Request) -> tuple[str, str]:
    """(actor, address): the operator's self-declared name (`x-bulwark-operator`), and the
    peer address the call came from."""
    actor = clean(request.headers.get("x-bulwark-operator", "") or "admin", 100)
    return actor, request.remote or ""


def _bus(request: web.Request) -> Bus:
    bus = request.app.get(BUS)
    if bus is None:
        raise ServiceUnavailable(
            "Admin changes need the shared database, and this gateway has none "
            "(DATABASE_URL is not set).", code="database_unavailable", retry_after=None)
    return bus


def _unavailable() -> GatewayError:
    return ServiceUnavailable("The shared database cannot be reached; nothing was changed. "
                              "Retry after the delay given.", code="database_unavailable",
                              retry_after=2.0)


async def _write(request: web.Request, what: str,
                 op: Callable[[Any], Awaitable[T]]) -> T:
    """Run `op` in one transaction on the bus's pool; 503 when Postgres is unreachable."""
    bus = _bus(request)

    async def in_tx(conn: Any) -> tuple[T]:
        async with conn.transaction():
            return (await op(conn),)

    # Boxed: an op may well return None, which bus.write uses for "unreachable".
    result = await bus.write(what, in_tx)
    if result is None:
        raise _unavailable()
    return result[0]


async def _read(request: web.Request, what: str,
                op: Callable[[Any], Awaitable[T]]) -> T:
    """Run a read on the bus's pool; 503 when Postgres is unreachable."""
    result = await _bus(request).write(what, lambda conn: _boxed(op, conn))
    if result is None:
        raise _unavailable()
    return result[0]


async def _boxed(op: Callable[[Any], Awaitable[T]], conn: Any) -> tuple[T]:
    # Boxed: an op may well return None, which bus.write uses for "unreachable".
    return (await op(conn),)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encoder.encode(body),
                        content_type="application/json")


def _provider(request: web.Request) -> str:
    name = request.match_info["provider"]
    if name not in request.app[ROUTER].runtimes:
        raise NotFound(f"No provider is called {name!r}.", code="provider_not_found",
                       param="provider")
    return name


def _live(value: Any, now: float) -> Any:
    """A forced/override value, or None once it has expired."""
    if not isinstance(value, dict):
        return None
    expires = value.get("expires_at")
    if isinstance(expires, (int, float)) and expires <= now:
        return None
    return value


# -- breakers ---------------------------------------------------------------------------------

@routes.get("/admin/reliability/circuit-breakers")
@describe("Every provider's breaker, fleet-wide and in this process", tags=_TAGS,
          responses={200: AdminBreakerList})
async def list_breakers(request: web.Request) -> web.Response:
    authorize(request)
    view, router = request.app[VIEW], request.app[ROUTER]
    now = time.time()
    out = []
    for name, rt in sorted(router.runtimes.items()):
        row = view.rows.get(name)
        out.append({
            "provider": name,
            # The fleet's state (the shared row); this process's own breaker beside it.
            "breaker": row.breaker if row is not None else str(rt.breaker.state),
            "health": str(row.health) if row is not None else "unknown",
            "reason": row.reason if row is not None else "",
            "updated_by": row.updated_by if row is not None else "",
            "open_for": row.open_for if row is not None else None,
            "forced": _live(view.fleet_value(forced.key(name)), now),
            "local": rt.breaker.snapshot(),
        })
    return _json({"breakers": out, "synced": view.synced})


@routes.post("/admin/reliability/circuit-breakers/{provider}/force-open")
@describe("Force a provider's breaker open, fleet-wide", tags=_TAGS, request=ForceOpen,
          responses={200: BreakerChanged}, errors=(404, 503), headers=_WRITE,
          description="No traffic goes to it until it is reset or `expires_in_sec` passes.")
async def force_open(request: web.Request) -> web.Response:
    authorize(request)
    name = _provider(request)
    body = await _body(request, ForceOpen)
    actor, address = _who(request)
    now = time.time()
    value = {"reason": clean(body.reason), "since": now,
             "expires_at": None if body.expires_in_sec is None else now + body.expires_in_sec,
             "by": f"{actor}@{address}"}

    async def op(conn: Any) -> None:
        await put_fleet_on(conn, forced.key(name), value, source=SOURCE)
        await record_action(conn, action="breaker.force_open", target=name,
                            reason=body.reason, actor=actor, address=address,
                            detail={"expires_in_sec": body.expires_in_sec})

    await _write(request, f"force-open {name}", op)
    # The forced row already keeps every router off it; the breaker row says so to
    # healthd, the status page and the breaker views.
    row = await _bus(request).publish(name, breaker="open", reason=f"forced open: {body.reason}",
                                      source=SOURCE, open_for=body.expires_in_sec)
    if row is None:
        raise _unavailable()
    return _json({"provider": name, "breaker": "open", "forced": value})


@routes.post("/admin/reliability/circuit-breakers/{provider}/reset")
@describe("Close a provider's breaker, fleet-wide (ends a force-open)", tags=_TAGS,
          request=Reset, responses={200: BreakerChanged}, errors=(404, 503),
          headers=_WRITE)
async def reset(request: web.Request) -> web.Response:
    authorize(request)
    name = _provider(request)
    body = await _body(request, Reset)
    actor, address = _who(request)

    async def op(conn: Any) -> None:
        await put_fleet_on(conn, forced.key(name), None, source=SOURCE)
        await record_action(conn, action="breaker.reset", target=name, reason=body.reason,
                            actor=actor, address=address)

    await _write(request, f"reset {name}", op)
    row = await _bus(request).publish(
        name, breaker="closed", reason=f"reset by operator{': ' if body.reason else ''}"
        f"{clean(body.reason)}", source=SOURCE)
    if row is None:
        raise _unavailable()
    return _json({"provider": name, "breaker": "closed", "forced": None})


# -- degradation ------------------------------------------------------------------------------




@routes.post("/admin/reliability/degradation")
@describe("Override the degradation level, fleet-wide", tags=_TAGS, request=SetDegradation,
          responses={200: DegradationSet}, errors=(503,), headers=_WRITE,
          description=("Also accepted without a body as query parameters "
                       "(`?level=&reason=&expires_in_sec=`), for a quick curl."))
async def set_degradation(request: web.Request) -> web.Response:
    authorize(request)
    body = await _body(request, SetDegradation, from_query=True)
    actor, address = _who(request)
    now = time.time()
    value = {"level": body.level, "reason": clean(body.reason), "since": now,
             "expires_at": None if body.expires_in_sec is None else now + body.expires_in_sec,
             "by": f"{actor}@{address}"}

    async def op(conn: Any) -> None:
        await put_fleet_on(conn, OPERATOR_KEY, value, source=SOURCE)
        await record_action(conn, action="degradation.set", target=body.level,
                            reason=body.reason, actor=actor, address=address,
                            detail={"expires_in_sec": body.expires_in_sec})

    await _write(request, "set degradation", op)
    return _json({"level": body.level, "source": "operator", **value})


@routes.delete("/admin/reliability/degradation")
@describe("Back to the automatic degradation level, fleet-wide", tags=_TAGS,
          query=WithReason, responses={200: DegradationCleared}, errors=(400, 503),
          headers=_WRITE)
async def clear_degradation(request: web.Request) -> web.Response:
    authorize(request)
    reason = decode_query(request.query, WithReason).reason
    actor, address = _who(request)

    async def op(conn: Any) -> None:
        await put_fleet_on(conn, OPERATOR_KEY, None, source=SOURCE)
        await record_action(conn, action="degradation.clear", target="auto", reason=reason,
                            actor=actor, address=address)

    await _write(request, "clear degradation", op)
    return _json({"source": "auto", "operator": None})


@routes.get("/admin/reliability/degradation")
@describe("The degradation level in force, and its operator and automatic rows",
          tags=_TAGS, responses={200: DegradationState})
async def get_degradation(request: web.Request) -> web.Response:
    """The rows as this process holds them (operators check one process against another)."""
    authorize(request)
    view = request.app[VIEW]
    _, status = effective(view, time.time())
    return _json({**msgspec.to_builtins(status), "operator": view.fleet_value(OPERATOR_KEY),
                  "auto": view.fleet_value(AUTO_KEY)})


# -- reports --------------------------------------------------------------------------------

@routes.get("/admin/reliability/reports/reliability")
@describe("The reliability report", tags=_TAGS, query=ReportQuery,
          responses={200: ReliabilityReport}, errors=(400, 503),
          description="The same figures as `python -m healthd report --json`.")
async def reliability(request: web.Request) -> web.Response:
    """The reliability report over `?since=` (24h by default): one Postgres read, on the
    admin path only. The same figures as `python -m healthd report`."""
    authorize(request)
    text = decode_query(request.query, ReportQuery).since
    try:
        since = duration_sec(text)
    except ValueError as err:
        raise InvalidRequest(str(err), code="invalid_since", param="since") from None
    if since > MAX_EXPIRY_SEC:  # Postgres intervals end somewhere; a report needs no more
        raise InvalidRequest(f"since {text!r} is longer than ten years.", code="invalid_since",
                             param="since")

    async def op(conn: Any) -> dict[str, Any]:
        return await reliability_report(conn, since)

    return _json(await _read(request, "reliability report", op))


# -- dead-letter queue -----------------------------------------------------------------------

class DlqRetry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(max_length=500)] = ""


class DlqPurge(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Reason
    #: Only dead jobs of this model; none: every model.
    model: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    #: Only jobs dead for longer than this; none: however recently.
    older_than_sec: Annotated[float, Meta(ge=0)] | None = None




@routes.get("/admin/reliability/dlq")
@describe("The dead-letter queue: counts and dead jobs, oldest first", tags=_TAGS,
          query=DlqQuery, responses={200: DlqPage}, errors=(400, 503))
async def list_dlq(request: web.Request) -> web.Response:
    """Dead jobs, oldest first (`?model=`, `?limit=` up to 500), with the queue's counts."""
    authorize(request)
    query = decode_query(request.query, DlqQuery)
    limit, model = query.limit, query.model

    async def op(conn: Any) -> dict[str, Any]:
        return {**await jobstore.dlq_counts(conn),
                "jobs": await jobstore.list_dead(conn, limit, model)}

    return _json(await _read(request, "list dlq", op))


@routes.post("/admin/reliability/dlq/{job_id}/retry")
@describe("Put a dead job back in the queue", tags=_TAGS, request=DlqRetry,
          responses={200: DlqRequeued}, errors=(404, 503), headers=_WRITE)
async def retry_dlq(request: web.Request) -> web.Response:
    """Put one dead job back in the queue now (attempts and age reset); 404 if not dead."""
    authorize(request)
    job_id = request.match_info["job_id"]
    body = await _body(request, DlqRetry)
    actor, address = _who(request)

    async def op(conn: Any) -> bool:
        requeued = await jobstore.retry_dead(conn, job_id)
        if requeued:
            await record_action(conn, action="dlq.retry", target=job_id, reason=body.reason,
                                actor=actor, address=address)
        return requeued

    if not await _write(request, "retry dead job", op):
        raise NotFound(f"No dead job {job_id!r}.", code="job_not_found", param="job_id")
    return _json({"id": job_id, "status": "queued"})


@routes.post("/admin/reliability/dlq/purge")
@describe("Delete dead jobs", tags=_TAGS, request=DlqPurge, responses={200: DlqPurged},
          errors=(503,), headers=_WRITE)
async def purge_dlq(request: web.Request) -> web.Response:
    """Delete dead jobs (of `model`, dead longer than `older_than_sec`), with a reason."""
    authorize(request)
    body = await _body(request, DlqPurge)
    actor, address = _who(request)

    async def op(conn: Any) -> int:
        n = await jobstore.purge_dead(conn, model=body.model,
                                      older_than_sec=body.older_than_sec)
        await record_action(conn, action="dlq.purge", target=body.model or "*",
                            reason=body.reason, actor=actor, address=address,
                            detail={"older_than_sec": body.older_than_sec, "purged": n})
        return n

    return _json({"purged": await _write(request, "purge dlq", op)})


# -- client keys ------------------------------------------------------------------------------

@routes.get("/admin/keys")
@describe("Every client key (never the keys themselves)", tags=_TAGS,
          responses={200: ClientKeyList}, errors=(503,))
async def list_keys(request: web.Request) -> web.Response:
    authorize(request)
    records = await _write(request, "list keys", clientkeys.list_all)
    # `loaded`: this process holds the record (and so enforces it): propagation, visible.
    here = request.app[GUARD].loaded
    return _json({"object": "list", "data": [
        {**clientkeys.public(r), "loaded": here(r.id)} for r in records]})


@routes.post("/admin/keys")
@describe("Create a client key", tags=_TAGS, request=clientkeys.NewKey,
          responses={201: ClientKeyCreated}, errors=(503,), headers=_WRITE,
          description="The answer holds the key itself: the only time it is ever shown.")
async def create_key(request: web.Request) -> web.Response:
    authorize(request)
    new = await _body(request, clientkeys.NewKey)
    actor, address = _who(request)
    record, key = await _write(request, "create key", lambda conn: clientkeys.create(
        conn, new, actor=actor, address=address, source=SOURCE))
    # The only time the key is ever shown.
    return _json({"key": key, **clientkeys.public(record)}, status=201)


@routes.delete("/admin/keys/{key_id}")
@describe("Revoke a client key, fleet-wide", tags=_TAGS, query=WithReason,
          responses={200: ClientKey}, errors=(400, 404, 503), headers=_WRITE)
async def revoke_key(request: web.Request) -> web.Response:
    authorize(request)
    key_id = request.match_info["key_id"]
    reason = clean(decode_query(request.query, WithReason).reason)
    actor, address = _who(request)
    record = await _write(request, "revoke key", lambda conn: clientkeys.revoke(
        conn, key_id, actor=actor, address=address, source=SOURCE, reason=reason))
    if record is None:
        raise NotFound(f"No client key has the id {key_id!r}.", code="key_not_found",
                       param="key_id")
    return _json(clientkeys.public(record))
