"""`GET /status`: the human status page, and `GET /status/events`, its live feed (SSE).

The page is three static files shipped in the package (`service/static/`): no CDN, no
build step. Its script opens one EventSource on `/status/events`; the first event is the
whole current state, and every later one the whole new state when something changed (see
`service.status_board`). The browser never polls: EventSource reconnects by itself after
a restart, and the first event after a reconnect is, again, the whole state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import web

from service.keys import PROVIDERS, ROUTER, SETTINGS, STATUS, VIEW
from service.openapi import Body, describe
from service.status_board import StatusBoard, sse

routes = web.RouteTableDef()

#: A comment line this often keeps idle proxies and load balancers from closing the
#: stream (most cut idle connections at 60 s).
KEEPALIVE_SEC = 15.0
#: How soon EventSource reconnects after the stream ends (a restart, a deploy).
RETRY_MS = 2000

_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
_ASSETS: dict[str, tuple[bytes, str]] = {
    f.name: (f.read_bytes(), _TYPES[f.name[f.name.rindex("."):]])
    for f in resources.files("service").joinpath("static").iterdir()
    if f.name.endswith(tuple(_TYPES))
}
#: Only our own files run on the page; data shown is set as text, never as markup.
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self' data:; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str) -> web.Response:
    body, ctype = _ASSETS[name]
    return web.Response(body=body, content_type=ctype, charset="utf-8",
                        headers=_PAGE_HEADERS)


_TAGS = ("status",)


@routes.get("/status")
@describe("The status page (HTML)", tags=_TAGS,
          responses={200: Body(str, media="text/html", description="The page.")})
async def page(request: web.Request) -> web.Response:
    return _asset("status.html")


@routes.get("/status/static/{name}")
@describe("The status page's script and style sheet", tags=_TAGS, errors=(404,),
          responses={200: (Body(str, media="text/javascript"), Body(str, media="text/css"))})
async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _ASSETS or name.endswith(".html"):
        raise web.HTTPNotFound
    return _asset(name)


@routes.get("/status/events")
@describe("The status page's live feed", tags=_TAGS, responses={200: Body(
    str, media="text/event-stream", description=(
        "Endless Server-Sent Events: `retry: 2000`, then `event: state` with the whole "
        "state as JSON in `data`, first at once and again whenever it changes; a "
        "`: keepalive` comment every 15 s."))})
async def events(request: web.Request) -> web.StreamResponse:
    """The board's snapshots as Server-Sent Events (`event: state`), the current one first."""
    board = request.app[STATUS]
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        # nginx and friends buffer responses by default: a live feed must not be.
        "X-Accel-Buffering": "no"})
    queue = board.subscribe()
    try:
        await resp.prepare(request)
        await resp.write(b"retry: %d\n\n" % RETRY_MS + sse("state", await board.current()))
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SEC)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            if item is None:  # shutting down
                break
            await resp.write(item)
    except (ConnectionResetError, OSError):
        pass  # the page went away: nothing to tell it
    finally:
        board.unsubscribe(queue)
    return resp


def setup(app: web.Application) -> None:
    """Routes, the board (a cleanup context after the router's), and the end of every
    stream on shutdown, so that open pages never hold up the drain."""
    app.add_routes(routes)

    async def board_ctx(app: web.Application) -> AsyncIterator[None]:
        board = StatusBoard(app[SETTINGS], app[PROVIDERS], app[VIEW], app[ROUTER])
        app[STATUS] = board
        async for _ in board.ctx(app):
            yield

    async def end_streams(app: web.Application) -> None:
        if STATUS in app:
            app[STATUS].close_all()

    app.cleanup_ctx.append(board_ctx)
    app.on_shutdown.append(end_streams)
