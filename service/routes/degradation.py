"""`GET /health/degradation`, and the `x-bulwark-degradation` header on every chat response.

The header is set as a response is prepared, so that an answer, a stream and an error of
the chat route (rendered by the edge) all carry it, from one place.
"""

from __future__ import annotations

from aiohttp import web

from bulwark.wire import encoder
from service.bodies import DegradationStatus
from service.keys import DEGRADATION
from service.openapi import describe

routes = web.RouteTableDef()

#: The chat routes whose every response says the fleet's level (CONTRACT.md).
CHAT_PATHS = frozenset({"/v1/chat/completions"})


@routes.get("/health/degradation")
@describe("The fleet's degradation level", tags=("health",),
          responses={200: DegradationStatus})
async def degradation(request: web.Request) -> web.Response:
    """The level every web process applies, where it comes from, why, since and until when."""
    status = request.app[DEGRADATION].status()
    return web.Response(body=encoder.encode(status), content_type="application/json")


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: a chat response says the level it was served under."""
    if request.path in CHAT_PATHS:
        response.headers["x-bulwark-degradation"] = request.app[DEGRADATION].level.label
