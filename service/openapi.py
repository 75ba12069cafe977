"""The OpenAPI 3.1 document at `GET /openapi.json`, generated, never hand-kept.

Each handler declares what it takes and answers, next to its route::

    @routes.post("/v1/feedback")
    @describe("Rate an answer", request=FeedbackRequest, responses={201: Feedback},
              errors=(503,))
    async def post_feedback(request: web.Request) -> web.Response: ...

At start-up the builder walks `app.router` (frozen by then) and describes every route
from its declaration; the schemas come from the very msgspec types the handler decodes
and encodes (`msgspec.json.schema_components`), so the document cannot drift from the
code. A route without a declaration is left out of the document and fails
tests/test_openapi.py; a handler that cannot carry the decorator (a class, a partial) is
declared by `declare(method, path, ...)` instead. Only `INTERNAL` paths are exempt.

What every operation gets without asking: `x-request-id` in and out (every response
carries it), the OpenAI error shape for each error status, 400 and 413 where there is a
body, and by path prefix the auth it is under — `/v1/*` a client key (optional until
keys exist, so the document marks it optional) with 401/403/429 and the `x-ratelimit-*`
headers, `/admin/*` the admin token with 401.
"""

from __future__ import annotations

import http
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
from aiohttp import web

from service.bodies import ErrorBody
from service.keys import OPENAPI

Auth = Literal["client", "admin", "none"]
H = TypeVar("H")

#: Paths served but deliberately not described (tools for operators of the formation, not
#: part of the contract). Empty today; an entry needs a reason beside it.
#: Paths that are no API: the edge's route for every path nothing else claims (its 404s
#: and 405s are in every operation's errors).
INTERNAL: frozenset[str] = frozenset({"/{_unrouted}"})

_ATTR = "__bulwark_openapi__"
_REF = "#/components/schemas/{name}"

# -- headers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    description: str
    schema: Mapping[str, Any]


_FLAG = {"type": "string", "enum": ["true", "false"]}
_LEVEL = {"type": "string", "enum": ["normal", "minor", "moderate", "severe", "critical"]}

#: Request headers an operation may list in `headers=`. x-request-id is on every one.
REQUEST_HEADERS: Mapping[str, Header] = {
    "x-request-id": Header(
        "Your id for this request, echoed in `x-request-id`. Up to 128 printable ASCII "
        "characters; anything else is replaced by a gateway id.", {"type": "string"}),
    "Idempotency-Key": Header(
        "The same key with the same body within 24 hours returns the first result.",
        {"type": "string", "pattern": "^[!-~]([ -~]{0,253}[!-~])?$"}),
    "Prefer": Header("`respond-async`: become a job (202) when nothing can answer now "
                     "(RFC 7240; other preferences are ignored).", {"type": "string"}),
    "Cache-Control": Header(
        "`no-store` keeps the answer out of the cache; `no-cache` refuses a stored one; "
        "other directives are ignored.", {"type": "string"}),
    "x-bulwark-accept-canned": Header(
        "`true`: the model's canned reply is acceptable when nothing can answer.", _FLAG),
    "x-bulwark-continue": Header(
        "`true`: a stream whose provider fails mid-answer is continued by the next one.",
        _FLAG),
    "x-bulwark-operator": Header(
        "Who is acting, for the audit trail (default `admin`); up to 100 characters.",
        {"type": "string"}),
}

#: Response headers an operation's responses may name (`Body.headers`/`optional_headers`).
RESPONSE_HEADERS: Mapping[str, Header] = {
    "x-request-id": Header("The request's id: the client's, echoed, or a new one.",
                           {"type": "string"}),
    "x-bulwark-provider": Header("The provider that answered.", {"type": "string"}),
    "x-bulwark-attempts": Header("Upstream attempts made for this answer.",
                                 {"type": "integer", "minimum": 0}),
    "x-bulwark-fallback": Header(
        "How the answer was found when the first choice could not give it.",
        {"type": "string",
         "enum": ["none", "failover", "model", "cache", "canned", "queued"]}),
    "x-bulwark-degradation": Header("The fleet's degradation level.", _LEVEL),
    "x-bulwark-cache-age": Header("Age in seconds of a stored answer served from cache.",
                                  {"type": "integer", "minimum": 0}),
    "Retry-After": Header("Seconds to wait before retrying.",
                          {"type": "integer", "minimum": 0}),
    "x-should-retry": Header(
        "`false` once the gateway has retried or failed over itself: do not retry again.",
        _FLAG),
    "Location": Header("Where the created resource is.", {"type": "string"}),
    "Idempotent-Replayed": Header(
        "`true`: the stored response of an earlier request with this Idempotency-Key.",
        {"type": "string", "enum": ["true"]}),
    "Preference-Applied": Header("`respond-async`: the request became a job (RFC 7240).",
                                 {"type": "string", "enum": ["respond-async"]}),
    **{f"x-ratelimit-{what}-{unit}": Header(
        f"OpenAI's rate limit header: {what} {unit} of the client key.",
        {"type": "string"} if what == "reset" else {"type": "integer"})
       for what in ("limit", "remaining", "reset") for unit in ("requests", "tokens")},
}
_RATELIMIT = tuple(h for h in RESPONSE_HEADERS if h.startswith("x-ratelimit-"))

# -- declarations ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Body:
    """A request or response body: a type msgspec can describe, under one media type."""

    type: Any = None
    media: str = "application/json"
    description: str = ""
    #: Response headers (RESPONSE_HEADERS names) always present / sometimes present.
    headers: tuple[str, ...] = ()
    optional_headers: tuple[str, ...] = ()
    #: Server-Sent Events (media `text/event-stream`): the type of each `data:` event's
    #: JSON. A stream may also carry the OpenAI error shape and ends `data: [DONE]`.
    events: Any = None
    #: Named example values (OpenAPI `examples`), or a function of the app that makes
    #: them (a request naming a model this gateway serves).
    examples: Mapping[str, Any] | Callable[[web.Application], Mapping[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    summary: str
    description: str
    tags: tuple[str, ...]
    request: Body | None
    responses: Mapping[int, tuple[Body, ...]]
    errors: tuple[int, ...]
    query: type | None
    headers: tuple[str, ...]
    auth: Auth | None


ResponseSpec = Any  # a type, a Body, a tuple of Bodies (one per media type), or None


def _bodies(spec: ResponseSpec) -> tuple[Body, ...]:
    if spec is None:
        return ()
    if isinstance(spec, Body):
        return (spec,)
    if isinstance(spec, tuple):
        return tuple(b if isinstance(b, Body) else Body(b) for b in spec)
    return (Body(spec),)


def _operation(summary: str, *, description: str = "", tags: tuple[str, ...] = (),
               request: Any = None, responses: Mapping[int, ResponseSpec],
               errors: tuple[int, ...] = (), query: type | None = None,
               headers: tuple[str, ...] = (), auth: Auth | None = None) -> Operation:
    for name in headers:
        if name not in REQUEST_HEADERS:
            raise ValueError(f"unknown request header {name!r}: add it to REQUEST_HEADERS")
    norm = {status: _bodies(spec) for status, spec in responses.items()}
    for bodies in norm.values():
        for body in bodies:
            for name in (*body.headers, *body.optional_headers):
                if name not in RESPONSE_HEADERS:
                    raise ValueError(f"unknown response header {name!r}")
    req = None if request is None else request if isinstance(request, Body) else Body(request)
    return Operation(summary=summary, description=description, tags=tags, request=req,
                     responses=norm, errors=errors, query=query, headers=headers, auth=auth)


def describe(summary: str, *, description: str = "", tags: tuple[str, ...] = (),
             request: Any = None, responses: Mapping[int, ResponseSpec],
             errors: tuple[int, ...] = (), query: type | None = None,
             headers: tuple[str, ...] = (), auth: Auth | None = None) -> Callable[[H], H]:
    """Describe the decorated handler in the OpenAPI document.

    `request`: the JSON body's type (or a Body). `responses`: status → type, Body, tuple
    of Bodies (one per media type) or None (no body). `errors`: statuses answered with the
    OpenAI error shape, beyond those added for every operation (module docstring).
    `query`: a Struct whose fields are the query parameters. `headers`: request headers
    from REQUEST_HEADERS. `auth`: overrides what the path prefix implies.
    """
    op = _operation(summary, description=description, tags=tags, request=request,
                    responses=responses, errors=errors, query=query, headers=headers,
                    auth=auth)

    def mark(handler: H) -> H:
        setattr(handler, _ATTR, op)
        return handler

    return mark


_DECLARED: dict[tuple[str, str], Operation] = {}


def declare(method: str, path: str, summary: str, **kw: Any) -> None:
    """Describe a route whose handler cannot carry `describe` (same arguments)."""
    _DECLARED[(method.upper(), path)] = _operation(summary, **kw)


def _declared(method: str, path: str, handler: object) -> Operation | None:
    op = getattr(handler, _ATTR, None)
    if isinstance(op, Operation):
        return op
    return _DECLARED.get((method, path))


def served_routes(app: web.Application) -> Iterator[tuple[str, str, web.AbstractRoute]]:
    """(method, path, route) of every route a client can call, but for the implicit HEAD
    of a GET and the INTERNAL paths."""
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or not path or path in INTERNAL:
            continue
        yield route.method, path, route


def undeclared(app: web.Application) -> list[tuple[str, str]]:
    """Routes served but missing from the document (a test keeps this empty)."""
    return sorted((m, p) for m, p, r in served_routes(app) if _declared(m, p, r.handler) is None)


# -- the builder -----------------------------------------------------------------------

_PARAM = re.compile(r"\(\?P<(\w+)>")


def _path_patterns(route: web.AbstractRoute) -> dict[str, str]:
    """name → regex of each path parameter, read back from aiohttp's compiled pattern."""
    info = route.resource.get_info() if route.resource is not None else {}
    pattern = info.get("pattern")
    if not isinstance(pattern, re.Pattern):
        return {}
    text = pattern.pattern
    out: dict[str, str] = {}
    for m in _PARAM.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if text[i] == "\\":
                i += 1
            i += 1
        out[m.group(1)] = text[m.end():i - 1]
    return out


def _auth_of(op: Operation, path: str) -> Auth:
    if op.auth is not None:
        return op.auth
    if path.startswith("/v1/"):
        return "client"
    if path.startswith("/admin/"):
        return "admin"
    return "none"


def _headers(names: tuple[str, ...], required: bool) -> dict[str, Any]:
    return {name: {"description": RESPONSE_HEADERS[name].description, "required": required,
                   "schema": dict(RESPONSE_HEADERS[name].schema)} for name in names}


class _Schemas:
    """Collects every type the document uses, then lets msgspec describe them together,
    so shared types become one component each."""

    def __init__(self) -> None:
        self.types: list[Any] = []

    def ref(self, type_: Any) -> int:
        self.types.append(type_)
        return len(self.types) - 1

    def build(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        schemas, components = msgspec.json.schema_components(self.types, ref_template=_REF)
        for type_ in self.types:
            extra = getattr(type_, "json_schema_extra", None)
            name = getattr(type_, "__name__", None)
            if isinstance(extra, dict) and name in components:
                components[name].update(extra)
        return list(schemas), dict(components)


def _media(body: Body, schemas: _Schemas, app: web.Application) -> dict[str, Any]:
    if body.events is None:
        out: dict[str, Any] = {"schema": {"$schema_index": schemas.ref(body.type)}}
        examples = body.examples(app) if callable(body.examples) else body.examples
        if examples:
            out["examples"] = {name: {"value": value} for name, value in examples.items()}
        return out
    # Before OpenAPI 3.2's itemSchema, the schema of an event stream describes one event
    # (what schemathesis checks each event against); the JSON in `data` is described with
    # JSON Schema's content keywords.
    data = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$schema_index": schemas.ref(body.events)},
        {"$schema_index": schemas.ref(ErrorBody)}]}}
    return {"schema": {
        "type": "object", "required": ["data"],
        "description": "One event; a complete stream ends with `data: [DONE]`, a failed one "
                       "with an error event and no [DONE].",
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, {"type": "string", **data}]}},
    }}


def _response(status: int, bodies: tuple[Body, ...], schemas: _Schemas,
              extra_optional: tuple[str, ...], app: web.Application) -> dict[str, Any]:
    description = next((b.description for b in bodies if b.description), "")
    out: dict[str, Any] = {"description": description or http.HTTPStatus(status).phrase}
    required = ("x-request-id", *(h for b in bodies for h in b.headers))
    optional = tuple(h for b in bodies for h in b.optional_headers) + extra_optional
    headers = _headers(tuple(dict.fromkeys(optional)), False)
    headers.update(_headers(tuple(dict.fromkeys(required)), True))
    out["headers"] = headers
    if bodies:
        out["content"] = {b.media: _media(b, schemas, app) for b in bodies}
    return out


_ERROR_TEXT = {
    400: "Invalid request: `param` names the field.",
    401: "Missing, unknown, expired or revoked key (`invalid_api_key`).",
    403: "The key may not do this (`model_not_allowed`, `permission_denied`).",
    404: "Not found.",
    409: "Conflict.",
    413: "The request body is too large (`request_too_large`).",
    422: "Unprocessable.",
    429: "Rate limited: wait `Retry-After` seconds.",
    502: "The providers answered with something invalid.",
    503: "Cannot answer now: wait `Retry-After` seconds when it is given.",
    504: "The request's deadline passed.",
}


def _error(status: int, schemas: _Schemas, extra_optional: tuple[str, ...],
           app: web.Application) -> dict[str, Any]:
    body = Body(ErrorBody, description=_ERROR_TEXT.get(status, ""),
                optional_headers=("Retry-After", "x-should-retry"))
    return _response(status, (body,), schemas, extra_optional, app)


def _query_params(query: type, components: dict[str, Any]) -> list[dict[str, Any]]:
    (ref,), found = msgspec.json.schema_components([query], ref_template=_REF)
    own = found.pop(ref["$ref"].rsplit("/", 1)[-1])
    components.update(found)
    required = set(own.get("required", ()))
    return [{"name": name, "in": "query", "required": name in required, "schema": schema,
             **({"description": schema["description"]} if "description" in schema else {})}
            for name, schema in own.get("properties", {}).items()]


def _operation_object(app: web.Application, route: web.AbstractRoute, op: Operation,
                      schemas: _Schemas) -> dict[str, Any]:
    method = route.method
    path = route.resource.canonical if route.resource is not None else ""
    auth = _auth_of(op, path)
    out: dict[str, Any] = {"summary": op.summary,
                           "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}"}
    if op.description:
        out["description"] = op.description
    if op.tags:
        out["tags"] = list(op.tags)
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "pattern": f"^{regex}$"}}
        for name, regex in _path_patterns(route).items()]
    params += [{"name": name, "in": "header", "required": False,
                "description": REQUEST_HEADERS[name].description,
                "schema": dict(REQUEST_HEADERS[name].schema)}
               for name in ("x-request-id", *op.headers)]
    if op.query is not None:
        params += [{"$query": op.query}]  # resolved once components exist
    out["parameters"] = params
    errors = set(op.errors)
    if op.request is not None:
        out["requestBody"] = {"required": True,
                              "content": {op.request.media: _media(op.request, schemas, app)}}
        errors |= {400, 413}
    extra: tuple[str, ...] = ()
    if auth == "client":
        out["security"] = [{"clientKey": []}, {}]
        errors |= {401, 403, 429}
        extra = _RATELIMIT
    elif auth == "admin":
        out["security"] = [{"adminToken": []}]
        errors |= {401}
    responses = {str(s): _response(s, b, schemas, extra, app)
                 for s, b in sorted(op.responses.items())}
    for status in sorted(errors - set(op.responses)):
        responses[str(status)] = _error(status, schemas, extra, app)
    out["responses"] = responses
    return out


def _resolve(node: Any, schemas: list[dict[str, Any]], components: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$schema_index" in node:
            return schemas[node["$schema_index"]]
        return {k: _resolve(v, schemas, components) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            if isinstance(item, dict) and "$query" in item:
                out += _query_params(item["$query"], components)
            else:
                out.append(_resolve(item, schemas, components))
        return out
    return node


def build_document(app: web.Application, *, title: str = "Bulwark",
                   version: str = "1") -> dict[str, Any]:
    """The OpenAPI 3.1 document of every declared route of `app`."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, route in served_routes(app):
        op = _declared(method, path, route.handler)
        if op is not None:
            paths.setdefault(path, {})[method.lower()] = _operation_object(
                app, route, op, schemas)
    built, components = schemas.build()
    resolved = _resolve(paths, built, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title, "version": version,
            "description": "OpenAI-compatible chat gateway. Errors are OpenAI-shaped; every "
                           "response carries x-request-id. See docs/API.md.",
        },
        "paths": dict(sorted(resolved.items())),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "clientKey": {"type": "http", "scheme": "bearer", "description": (
                    "A client key. Required on /v1/* once any key exists (or with "
                    "BULWARK_REQUIRE_KEYS=true); until then, optional.")},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "BULWARK_ADMIN_TOKEN."},
            },
        },
    }


# -- the route ---------------------------------------------------------------------------

routes = web.RouteTableDef()


async def document_ctx(app: web.Application) -> AsyncIterator[None]:
    """Built once at start-up: the router is frozen by then, and the document is a pure
    function of it."""
    app[OPENAPI] = msgspec.json.encode(build_document(app))
    yield


@routes.get("/openapi.json")
@describe("This document", tags=("meta",),
          responses={200: Body(dict[str, Any], description="The OpenAPI 3.1 document.")})
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")
