"""The `Prefer: respond-async` path (RFC 7240): a chat request that nothing can answer now
becomes a durable job, answered 202 like `POST /v1/chat/jobs`."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from bulwark.errors import GatewayError, ServiceUnavailable
from bulwark.wire import ChatRequest, encoder
from service.keys import JOBS, REQUEST_ID


def accepted(rec: asyncpg.Record, extra: dict[str, str] | None = None) -> web.Response:
    """202 with the job object, as POST /v1/chat/jobs and a queued chat request answer."""
    body = {"id": rec["id"], "object": "chat.job", "status": rec["status"],
            "created_at": int(rec["created_at"])}
    headers = {"Location": f"/v1/chat/jobs/{rec['id']}", **(extra or {})}
    return web.Response(status=202, body=encoder.encode(body), content_type="application/json",
                        headers=headers)


def prefers_async(request: web.Request) -> bool:
    """RFC 7240: `Prefer: respond-async`, possibly among other preferences."""
    prefer = request.headers.get("Prefer")
    if not prefer:
        return False
    return any(p.split(";", 1)[0].strip().lower() == "respond-async"
               for p in prefer.split(","))


async def queue_instead(request: web.Request, chat: ChatRequest,
                        err: GatewayError | None = None) -> web.Response:
    """Store a chat request that nothing can answer now as a job: 202, or — when the job
    store itself is unreachable — the error the client would have had anyway."""
    jobs = request.app.get(JOBS)
    if jobs is None:
        raise err or ServiceUnavailable("No provider can answer this model right now.")
    try:
        rec = await jobs.submit(chat, callback_url=None, metadata=None,
                                request_id=request[REQUEST_ID])
    except ServiceUnavailable:
        if err is not None:
            raise err from None
        raise
    return accepted(rec, {"Preference-Applied": "respond-async",
                          "x-bulwark-fallback": "queued", "x-bulwark-provider": "none"})
