"""`GET /health/degradation`. (The `x-bulwark-degradation` header of every chat response is
set by the edge, service/edge.py, and by a stream as it starts, service/routes/chat.py.)"""

from __future__ import annotations

from aiohttp import web

from bulwark.wire import encoder
from service.bodies import DegradationStatus
from service.keys import DEGRADATION
from service.openapi import describe

routes = web.RouteTableDef()


@routes.get("/health/degradation")
@describe("The fleet's degradation level", tags=("health",),
          responses={200: DegradationStatus})
async def degradation(request: web.Request) -> web.Response:
    """The level every web process applies, where it comes from, why, since and until when."""
    status = request.app[DEGRADATION].status()
    return web.Response(body=encoder.encode(status), content_type="application/json")
