"""CORS for browser chat clients: off unless BULWARK_CORS_ORIGINS is set; then preflights
are answered and responses readable by the allowed origins only — checked with raw HTTP
and with a real browser (headless Chromium) calling from another origin."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from bulwark.config import ConfigError, Settings, cors_origins, settings_from_env
from service.cors import Cors
from service.keys import CORS
from tests.conftest import Gateway, GatewayFactory, SimFactory, provider

PAGE = "https://chat.example.com"
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}


async def _gateway(gateway: GatewayFactory, sim: SimFactory, origins: tuple[str, ...]) -> Gateway:
    alpha = await sim("alpha")
    return await gateway([provider("alpha", alpha.url)],
                         settings=Settings(http_backoff_base_ms=0, cors_origins=origins))


async def _call(gw: Gateway, method: str, path: str, *, headers: dict[str, str],
                json: Any = None) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with aiohttp.ClientSession() as s, s.request(
            method, gw.server.make_url(path), headers=headers, json=json) as r:
        return r.status, r.headers, await r.read()


def _preflight(origin: str, method: str = "POST",
               headers: str = "authorization, content-type") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}


def test_origins_from_the_environment() -> None:
    """BULWARK_CORS_ORIGINS is a comma-separated list of origins (normalised) or `*`;
    anything that is not an origin refuses to start; unset means none."""
    assert cors_origins(" https://A.example.com/ ,http://localhost:3000") == (
        "https://a.example.com", "http://localhost:3000")
    assert cors_origins("https://a.example.com,*") == ("*",)
    assert settings_from_env({}).cors_origins == ()
    assert settings_from_env({"BULWARK_CORS_ORIGINS": PAGE}).cors_origins == (PAGE,)
    for bad in ("chat.example.com", "https://a.example.com/app", "ftp://x"):
        with pytest.raises(ConfigError, match="BULWARK_CORS_ORIGINS"):
            cors_origins(bad)


async def test_unset_means_no_cors_at_all(gateway: GatewayFactory, sim: SimFactory) -> None:
    """Without origins nothing is installed (no per-response hook), responses carry no
    CORS header, and a preflight is the plain 405 (with Allow)."""
    gw = await _gateway(gateway, sim, ())
    assert CORS not in gw.app
    assert not any(isinstance(getattr(hook, "__self__", None), Cors)
                   for hook in gw.app.on_response_prepare)
    status, headers, _ = await _call(gw, "POST", "/v1/chat/completions",
                                     headers={"Origin": PAGE}, json=CHAT)
    assert status == 200
    assert not any(h.lower().startswith("access-control-") for h in headers)
    status, headers, _ = await _call(gw, "OPTIONS", "/v1/chat/completions",
                                     headers=_preflight(PAGE))
    assert status == 405
    assert headers["Allow"] == "POST"
    assert "Access-Control-Allow-Origin" not in headers


async def test_preflight_from_an_allowed_origin(gateway: GatewayFactory, sim: SimFactory) -> None:
    """A preflight gets 204 with the path's methods, the asked-for headers we accept (ours,
    the SDK's, by prefix for x-bulwark-*/x-stainless-*), not others, and a max-age."""
    gw = await _gateway(gateway, sim, (PAGE, "http://localhost:3000"))
    asked = ("Authorization, Content-Type, Idempotency-Key, X-Request-Id, Prefer, "
             "Cache-Control, x-bulwark-accept-canned, x-stainless-os, x-evil")
    status, headers, _ = await _call(gw, "OPTIONS", "/v1/chat/completions",
                                     headers=_preflight(PAGE, headers=asked))
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == PAGE
    assert "Origin" in headers.getall("Vary")
    assert headers["Access-Control-Allow-Methods"] == "POST"
    granted = headers["Access-Control-Allow-Headers"].split(", ")
    assert granted == ["authorization", "content-type", "idempotency-key", "x-request-id",
                       "prefer", "cache-control", "x-bulwark-accept-canned", "x-stainless-os"]
    assert int(headers["Access-Control-Max-Age"]) > 0
    assert headers["x-request-id"]
    status, headers, _ = await _call(gw, "OPTIONS", "/v1/models",
                                     headers=_preflight("http://localhost:3000", "GET", ""))
    assert (status, headers["Access-Control-Allow-Methods"]) == (204, "GET")
    assert "Access-Control-Allow-Headers" not in headers


async def test_other_origins_get_nothing(gateway: GatewayFactory, sim: SimFactory) -> None:
    """An origin not on the list: its preflight is a 403 cors_origin_not_allowed, and its
    responses carry no Access-Control-Allow-Origin (the browser will not let it read)."""
    gw = await _gateway(gateway, sim, (PAGE,))
    status, headers, body = await _call(gw, "OPTIONS", "/v1/chat/completions",
                                        headers=_preflight("https://evil.example"))
    assert status == 403
    assert b"cors_origin_not_allowed" in body
    assert "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await _call(gw, "POST", "/v1/chat/completions",
                                     headers={"Origin": "https://evil.example"}, json=CHAT)
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers
    assert "Origin" in headers.getall("Vary")


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_expose_our_headers(gateway: GatewayFactory, sim: SimFactory,
                                            stream: bool) -> None:
    """Answers (streamed or not) and errors to an allowed origin carry the origin and
    expose x-request-id, x-bulwark-* and x-ratelimit-* to the page."""
    gw = await _gateway(gateway, sim, (PAGE,))
    status, headers, _ = await _call(gw, "POST", "/v1/chat/completions",
                                     headers={"Origin": PAGE}, json={**CHAT, "stream": stream})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == PAGE
    exposed = {h.strip().lower() for h in headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "x-bulwark-provider", "x-bulwark-attempts", "x-bulwark-fallback",
            "x-bulwark-degradation", "x-ratelimit-remaining-requests", "retry-after"} <= exposed
    status, headers, _ = await _call(gw, "POST", "/v1/chat/completions",
                                     headers={"Origin": PAGE}, json={**CHAT, "model": "nope"})
    assert status == 404
    assert headers["Access-Control-Allow-Origin"] == PAGE


async def test_star_allows_any_origin(gateway: GatewayFactory, sim: SimFactory) -> None:
    """With `*`, any origin may call, and the answer says `*` (cacheable, no Vary)."""
    gw = await _gateway(gateway, sim, ("*",))
    status, headers, _ = await _call(gw, "OPTIONS", "/v1/chat/completions",
                                     headers=_preflight("https://anyone.example"))
    assert (status, headers["Access-Control-Allow-Origin"]) == (204, "*")
    status, headers, _ = await _call(gw, "GET", "/v1/models",
                                     headers={"Origin": "https://anyone.example"})
    assert (status, headers["Access-Control-Allow-Origin"]) == (200, "*")
    assert "Vary" not in headers


_SCRIPT = """async ([url, key]) => {
  const r = await fetch(url + "/v1/chat/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json",
              "x-request-id": "from-the-browser", "x-bulwark-accept-canned": "true"},
    body: JSON.stringify({model: "default", messages: [{role: "user", content: "hi"}]}),
  });
  const body = await r.json();
  return {status: r.status, provider: r.headers.get("x-bulwark-provider"),
          rid: r.headers.get("x-request-id"), object: body.object};
}"""


async def test_a_browser_on_another_origin_can_chat(gateway: GatewayFactory, sim: SimFactory,
                                                    aiohttp_server: Any) -> None:
    """Headless Chromium, on a page of another origin, sends a chat request with an
    Authorization header (so a real preflight), and reads the answer and our headers;
    a page of an origin not on the list is refused by the browser."""
    from playwright.async_api import Error, async_playwright

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>chat</title>", content_type="text/html")

    site = web.Application()
    site.router.add_get("/", page)
    allowed = await aiohttp_server(site)
    other = await aiohttp_server(site)
    page_origin = str(allowed.make_url("")).rstrip("/")
    gw = await _gateway(gateway, sim, (page_origin,))
    api = str(gw.server.make_url("")).rstrip("/")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium",
                                          args=["--no-sandbox"])
        try:
            tab = await browser.new_page()
            await tab.goto(str(allowed.make_url("/")))
            got = await tab.evaluate(_SCRIPT, [api, "sk-browser-key"])
            assert got == {"status": 200, "provider": "alpha", "rid": "from-the-browser",
                           "object": "chat.completion"}
            await tab.goto(str(other.make_url("/")))
            with pytest.raises(Error, match="Failed to fetch"):
                await tab.evaluate(_SCRIPT, [api, "sk-browser-key"])
        finally:
            await browser.close()
