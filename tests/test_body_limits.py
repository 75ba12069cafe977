"""Every route's body is bounded: an oversize body is a 413 in OpenAI's error shape, from
every route the app serves (found by walking the router, so a route added later is
covered), whether its handler reads the body or not — never a 500, never a hang."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp

from bulwark.config import Settings
from service.openapi import build_document, served_routes
from tests.conftest import GatewayFactory, SimFactory, provider

#: Small, so that the test sends little; the bound is the same code at any size.
LIMIT = 64 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=15)


#: The admin API authenticates (and finds the provider) before it reads a body: a
#: chunked body is refused 413 only once those pass, so the test gets that far.
ADMIN_TOKEN = "body-limits-admin-token"


def _url_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path.replace("{provider}", "alpha"))


async def test_every_route_refuses_an_oversize_body(gateway: GatewayFactory,
                                                    sim: SimFactory) -> None:
    """A body over BULWARK_MAX_BODY_BYTES sent with Content-Length gets 413
    request_too_large from every route and method; one sent chunked (no length) gets it
    from every operation that takes a body."""
    alpha = await sim("alpha")
    gw = await gateway([provider("alpha", alpha.url)],
                       settings=Settings(http_backoff_base_ms=0, max_body_bytes=LIMIT,
                                         admin_token=ADMIN_TOKEN))
    doc = build_document(gw.app)
    big = b"{" + b" " * LIMIT + b"}"
    tried: set[tuple[str, str]] = set()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for method, path, _ in served_routes(gw.app):
            url = gw.server.make_url(_url_path(path))
            headers = {"Content-Type": "application/json",
                       "Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with s.request(method, url, data=big, headers=headers) as r:
                body = await r.json(content_type=None)
                assert r.status == 413, (method, path, r.status, body)
                assert body["error"]["code"] == "request_too_large"
                assert r.headers["x-request-id"]
            tried.add((method, path))
            if "requestBody" not in doc["paths"][path][method.lower()]:
                continue

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(big), 8192):
                    yield big[i:i + 8192]

            async with s.request(method, url, data=chunks(), headers=headers) as r:
                body = await r.json(content_type=None)
                assert r.status == 413, (method, path, "chunked", r.status, body)
                assert body["error"]["code"] == "request_too_large"
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/feedback"),
            ("GET", "/v1/models"), ("GET", "/health/live")} <= tried
