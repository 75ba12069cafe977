"""`GET /metrics`: Prometheus text, every web process of this host in one answer."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bulwark import metrics

routes = web.RouteTableDef()


@routes.get("/metrics")
async def scrape(request: web.Request) -> web.Response:
    # This process's latest counts first (on the loop's thread, where they are counted).
    metrics.flush()
    # Reading every process's files is a few milliseconds of pure Python: in a thread, so
    # the loop keeps serving between the interpreter's switches.
    body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
