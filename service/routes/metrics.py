"""`GET /metrics`: Prometheus text, every web process of this host in one answer."""

from __future__ import annotations

import asyncio

from aiohttp import web

from bulwark import metrics
from service.openapi import Body, describe

routes = web.RouteTableDef()


@routes.get("/metrics")
@describe("Prometheus metrics of every web process of this host", tags=("operations",),
          description=("Prometheus text exposition format, names starting `bulwark_`. When "
                       "`BULWARK_METRICS_TOKEN` is set, a bearer token is required."),
          responses={200: Body(str, media="text/plain")}, errors=(401,), auth="none")
async def scrape(request: web.Request) -> web.Response:
    # This process's latest counts first (on the loop's thread, where they are counted).
    metrics.flush()
    # Reading every process's files is a few milliseconds of pure Python: in a thread, so
    # the loop keeps serving between the interpreter's switches.
    body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
