"""`POST /v1/feedback`: a user's rating of an answer, stored before the 201.

Unlike the chat path, this route waits on Postgres: a 201 means the feedback is stored.
It is one INSERT on the bus's write pool (`FeedbackWriter`: one at a time, 2 s at most
including the wait for its turn), and nothing on the chat path waits for it. Without a
database — none configured, or unreachable — the answer is 503 `feedback_unavailable`.
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from bulwark.errors import ServiceUnavailable
from bulwark.feedback import MAX_BODY_BYTES, Feedback, FeedbackRequest
from service.inputs import decode_body, read_body
from service.keys import FEEDBACK
from service.openapi import Body, describe

routes = web.RouteTableDef()

_decoder = msgspec.json.Decoder(FeedbackRequest)
_encoder = msgspec.json.Encoder()
#: How long a client should wait before retrying when Postgres is unreachable: the bus
#: reconnects with backoff, and a few seconds covers a database restart.
RETRY_AFTER_SEC = 5.0


@routes.post("/v1/feedback")
@describe(
    "Rate an answer", tags=("feedback",),
    request=Body(FeedbackRequest, examples={
        "thumbs-up": {"request_id": "req_0123456789ab000000000001", "rating": 1},
        "stars": {"request_id": "req_0123456789ab000000000002", "rating": 4,
                  "scale": "stars", "comment": "Right answer, a bit slow.",
                  "tags": ["slow"]},
    }),
    description=(
        "Thumbs (-1, 0, 1) or stars (1..5) for the answer with this `request_id`, with an "
        "optional comment and tags. `scale` says which; without it, -1 and 0 are thumbs, "
        "2..5 stars, and 1 is a thumbs-up. The id is not checked against past requests."),
    responses={201: Feedback}, errors=(503,))
async def post_feedback(request: web.Request) -> web.Response:
    fb = decode_body(await read_body(request, MAX_BODY_BYTES), _decoder)
    writer = request.app.get(FEEDBACK)
    if writer is None:
        raise ServiceUnavailable("Feedback cannot be stored: this gateway runs without a "
                                 "database.", code="feedback_unavailable", should_retry=False)
    # Client keys (once they exist) will name the key's id here; never the key itself.
    stored = await writer.store(fb, client_key_id=None)
    if stored is None:
        raise ServiceUnavailable("Feedback cannot be stored right now; retry after the "
                                 "delay given.", code="feedback_unavailable",
                                 retry_after=RETRY_AFTER_SEC)
    return web.Response(status=201, body=_encoder.encode(stored),
                        content_type="application/json")
