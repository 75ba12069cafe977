"""CORS for browser chat clients (`BULWARK_CORS_ORIGINS`).

Unset, nothing here runs: no signal is installed and the edge never looks at an Origin
header. Set, two things happen:

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) reaches the
  edge middleware as the router's 405 (no route answers OPTIONS), and the edge answers it
  here instead: 204 with the path's methods, the request headers we accept, and a max-age;
  403 `cors_origin_not_allowed` for an origin not on the list. The happy path of every
  other request pays nothing for it.
- Every response (errors, streams and WebSocket upgrades too: `on_response_prepare` runs
  before any header is sent) to an allowed origin gets `Access-Control-Allow-Origin` and
  `Access-Control-Expose-Headers`, so the page can read x-request-id, x-bulwark-*,
  x-ratelimit-* and Retry-After.

No cookies are involved (keys travel in `Authorization`), so there is no
`Access-Control-Allow-Credentials`; with `*`, any origin may call, as with a public API.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from bulwark.errors import PermissionDenied

#: Request headers a page may send: the SDK's and ours. x-bulwark-* and the openai JS
#: SDK's x-stainless-* are accepted by prefix, so a new one needs no change here.
ALLOW_HEADERS = frozenset({
    "authorization", "content-type", "idempotency-key", "x-request-id", "prefer",
    "cache-control", "openai-organization", "openai-project", "traceparent", "tracestate",
})
_ALLOW_PREFIXES = ("x-bulwark-", "x-stainless-")
EXPOSE_HEADERS = ", ".join((
    "x-request-id", "x-bulwark-provider", "x-bulwark-attempts", "x-bulwark-fallback",
    "x-bulwark-degradation", "x-bulwark-cache-age", "x-should-retry", "Retry-After",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "Idempotent-Replayed",
    "Preference-Applied", "Location",
))
#: Chromium caps a preflight's cache at 2 h (Firefox allows 24 h). Long is safe: an origin
#: removed from the list loses access at once, because real responses stop carrying
#: Access-Control-Allow-Origin.
MAX_AGE_SEC = 7200


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origins)
        self.any = "*" in self.origins

    def allows(self, origin: str) -> bool:
        return self.any or origin.lower() in self.origins

    def _allow_origin(self, origin: str, response: web.StreamResponse) -> None:
        h = response.headers
        if self.any:
            h["Access-Control-Allow-Origin"] = "*"
        else:
            h["Access-Control-Allow-Origin"] = origin
            h.add("Vary", "Origin")

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or not self.allows(origin):
            if not self.any:
                # Caches must not serve one origin's answer (with its ACAO) to another.
                response.headers.add("Vary", "Origin")
            return
        if "Access-Control-Allow-Origin" not in response.headers:
            self._allow_origin(origin, response)
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS

    def preflight(self, request: web.Request,
                  allowed_methods: Iterable[str]) -> web.Response | None:
        """The answer to a preflight, or None when `request` is not one."""
        origin = request.headers.get("Origin")
        if origin is None or "Access-Control-Request-Method" not in request.headers:
            return None
        if not self.allows(origin):
            raise PermissionDenied(f"The origin {origin!r} may not call this API "
                                   "(BULWARK_CORS_ORIGINS).", code="cors_origin_not_allowed")
        asked = request.headers.get("Access-Control-Request-Headers", "")
        granted = [h for h in (a.strip().lower() for a in asked.split(","))
                   if h and (h in ALLOW_HEADERS or h.startswith(_ALLOW_PREFIXES))]
        methods = sorted({m.upper() for m in allowed_methods} - {"HEAD"})
        resp = web.Response(status=204, headers={
            "Access-Control-Allow-Methods": ", ".join(methods),
            "Access-Control-Max-Age": str(MAX_AGE_SEC),
        })
        if granted:
            resp.headers["Access-Control-Allow-Headers"] = ", ".join(granted)
        self._allow_origin(origin, resp)
        return resp


def install(app: web.Application, origins: Iterable[str]) -> None:
    """Turn CORS on for `origins`; with none, do nothing at all."""
    from service.keys import CORS

    origins = tuple(origins)
    if not origins:
        return
    cors = Cors(origins)
    app[CORS] = cors
    app.on_response_prepare.append(cors.on_prepare)
