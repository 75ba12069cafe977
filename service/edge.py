"""The one layer every request passes: request id in, body bound, errors out as OpenAI
JSON (and, when CORS is configured, preflights answered: service/cors.py).

Not an aiohttp middleware: an application with any middleware also gets aiohttp's own
`_fix_request_current_app` layer, and both cost a coroutine frame (and a cached handler
lookup) on every request of a path measured against a bare proxy. `install()` wraps each
route's handler instead, once at start-up, and routes every path no route claims to one
handler, so that a 404 or 405 is OpenAI JSON too.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from aiohttp import web

from bulwark.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from bulwark.telemetry import TRACED_PREFIXES
from bulwark.wire import encoder
from service.keys import CORS, DEGRADATION, GUARD, RATE_HEADERS, REQUEST_ID, TRACING

log = logging.getLogger("bulwark.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# A random per-process prefix and a counter: unique across processes and restarts, and
# ~1 µs cheaper per request than os.urandom (which is a syscall).
_PREFIX = "req_" + os.urandom(6).hex()
_counter = itertools.count()


def new_request_id() -> str:
    return f"{_PREFIX}{next(_counter):012x}"


def _valid_request_id(value: str) -> bool:
    # Echo a client's id only when it cannot smuggle anything into headers or logs.
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable()


def error_response(err: GatewayError, request_id: str,
                   extra: dict[str, str] | None = None) -> web.Response:
    headers = err.headers()
    headers["x-request-id"] = request_id
    if extra:
        headers.update(extra)
    return web.Response(status=err.status, body=encoder.encode(err.body()),
                        content_type="application/json", headers=headers)


class _MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("Unknown path.", code="not_found")
    if exc.status == 413:
        return PayloadTooLarge("The request body is too large.")
    return InvalidRequest(exc.reason or "Invalid request.")


def _method_not_allowed(request: web.Request, exc: web.HTTPMethodNotAllowed,
                        rid: str) -> web.Response:
    # No route answers OPTIONS: a CORS preflight arrives here, off the happy path.
    cors = request.app.get(CORS) if request.method == "OPTIONS" else None
    if cors is not None:
        try:
            preflight = cors.preflight(request, exc.allowed_methods)
        except GatewayError as err:
            return error_response(err, rid)
        if preflight is not None:
            preflight.headers["x-request-id"] = rid
            return preflight
    resp = error_response(_MethodNotAllowed("Method not allowed on this path."), rid)
    resp.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
    return resp


#: The paths whose responses say the degradation level they were served under.
CHAT_PATHS = frozenset({"/v1/chat/completions"})
DEGRADATION_HEADER = "x-bulwark-degradation"


def edged(handler: Handler) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
    """`handler` behind the edge. Keeps the handler's attributes (its OpenAPI operation)."""

    async def edge(request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("x-request-id", "")
        if not _valid_request_id(rid):
            rid = new_request_id()
        request[REQUEST_ID] = rid
        # Every route's body is bounded here, before its handler runs, whether or not the
        # handler reads it (aiohttp itself checks only when a handler reads); a body sent
        # without Content-Length is bounded by client_max_size when read.
        if request.body_exists:
            length = request.content_length
            if length is not None and length > request.client_max_size:
                return error_response(PayloadTooLarge(
                    f"The request body is larger than {request.client_max_size} bytes."), rid)
        app = request.app  # a property that walks the match info: read it once
        tracing = app[TRACING]
        if tracing is not None and request.path.startswith(TRACED_PREFIXES):
            return await tracing.serve(request, lambda r: _answer(r, handler, rid, app), rid)
        return await _answer(request, handler, rid, app)

    functools.update_wrapper(edge, handler)
    return edge


#: The route of every path no other route claims (last in aiohttp's lookup: the most
#: specific resource wins), and its canonical form.
NO_ROUTE_PATH = "/{_unrouted:.*}"
NO_ROUTE = "/{_unrouted}"


async def _no_route(request: web.Request) -> web.StreamResponse:
    """No route for this method and path: 405 with `Allow` when the path has other methods
    (a CORS preflight among them), else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != NO_ROUTE:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound


def install(app: web.Application) -> None:
    """Put the edge in front of every route; call once every route is added."""
    app.router.add_route("*", NO_ROUTE_PATH, _no_route)
    for route in app.router.routes():
        # aiohttp has no public way to wrap a registered route's handler (`_handler` is
        # what `route.handler` returns and what the request is dispatched to; 3.14).
        route._handler = edged(route.handler)


async def _answer(request: web.Request, handler: Handler, rid: str,
                  app: web.Application) -> web.StreamResponse:
    # Client keys, rate limits and the process bulkhead (service/auth.py) for the API;
    # while no key exists that is a counter and one boolean.
    guard = app[GUARD]
    path = request.path
    api = path.startswith("/v1/")
    count = api and path != "/v1/ws"  # a WebSocket would hold a slot for its lifetime
    entered = False
    resp: web.StreamResponse
    try:
        if api:
            await guard.enter(request, count=count)
            entered = True
        elif guard.metrics_token is not None and path == "/metrics":
            guard.check_metrics(request)
        resp = await handler(request)
    except GatewayError as err:
        resp = error_response(err, rid, request.get(RATE_HEADERS) if guard.keys_on else None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPMethodNotAllowed):
            resp = _method_not_allowed(request, exc, rid)
        else:
            resp = error_response(_from_http_exception(exc), rid)
    except msgspec.MsgspecError:  # pragma: no cover - decoders are wrapped where used
        log.exception("unhandled decode error", extra={"request_id": rid})
        resp = error_response(InvalidRequest("Invalid request body."), rid)
    except Exception:
        log.exception("unhandled error", extra={"request_id": rid})
        internal = GatewayError("The gateway failed to handle this request.",
                                code="internal_error")
        resp = error_response(internal, rid)
    finally:
        if entered:
            guard.leave(request, count=count)
    if not resp.prepared:
        headers = resp.headers
        headers["x-request-id"] = rid
        if guard.keys_on:
            limits = request.get(RATE_HEADERS)
            if limits:
                headers.update(limits)
        if path in CHAT_PATHS:
            # Here rather than in an on_response_prepare signal, which every response of
            # every path would pay for; a stream sets it itself (service/routes/chat.py).
            headers[DEGRADATION_HEADER] = app[DEGRADATION].level.label
    return resp
