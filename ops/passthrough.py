"""The bare baseline of the chat-path benchmark: an aiohttp pass-through proxy.

It does the least a proxy in front of a chat API can do on the same stack as the gateway
(aiohttp server and client, uvloop): forward the request body of `POST /v1/chat/completions`
to one upstream through one shared ClientSession, and answer the upstream's body — whole,
or for an SSE answer, relayed read by read as it arrives. No validation, no header logic,
no retries: whatever the gateway costs beyond this is the price of its features.

`GET /health/live` answers 200 so that the benchmark can time readiness the same way for
both servers.

    python -m ops.passthrough --port 9400 --upstream http://127.0.0.1:9300/v1
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
CHAT_URL = web.AppKey("chat_url", str)
_JSON = {"Content-Type": "application/json"}


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(request.app[CHAT_URL], data=body,
                                         headers=_JSON) as up:
        ctype = up.headers.get("Content-Type", "application/json")
        if not ctype.startswith("text/event-stream"):
            return web.Response(status=up.status, body=await up.read(),
                                headers={"Content-Type": ctype})
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
        await resp.prepare(request)
        async for data in up.content.iter_any():
            await resp.write(data)
        await resp.write_eof()
        return resp


async def live(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"pass"}', content_type="application/json")


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    app[CHAT_URL] = upstream.rstrip("/") + "/chat/completions"

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # The gateway's pool size, so that neither queues for a socket at c=128.
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=500, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health/live", live)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.passthrough",
                                     description="bare aiohttp chat pass-through (baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--upstream", default="http://127.0.0.1:9300/v1",
                        help="base URL; requests go to {upstream}/chat/completions")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    web.run_app(create_app(args.upstream), host=args.host, port=args.port, access_log=None,
                print=None, loop=loop)


if __name__ == "__main__":
    main()
