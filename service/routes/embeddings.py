"""`POST /v1/embeddings`: OpenAI-compatible embeddings through the dispatcher's attempt loop."""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from bulwark.embeddings import (
    EmbeddingList,
    EmbeddingRequest,
    check,
    encode_response,
    request_decoder,
)
from bulwark.errors import NotFound, PayloadTooLarge
from service.auth import check_model
from service.dispatch import EmbedRequest
from service.inputs import decode_body
from service.keys import DISPATCHER, MODELS, REQUEST_ID, ROUTER, SETTINGS
from service.openapi import Body, describe

routes = web.RouteTableDef()

def _decode(body: bytes) -> EmbeddingRequest:
    # As every body but chat's: a 400 naming the field, and `"dimensions": 8.0` is 8.
    return decode_body(body, request_decoder)


def _examples(app: web.Application) -> dict[str, object]:
    model = min(app[MODELS].keys(), default="default")
    return {"texts": {"model": model, "input": ["Hello", "world"]}}


@routes.post("/v1/embeddings")
@describe("Create embeddings", tags=("embeddings",),
          request=Body(EmbeddingRequest, examples=_examples),
          responses={200: Body(EmbeddingList, headers=(
              "x-bulwark-provider", "x-bulwark-attempts", "x-bulwark-fallback"))},
          errors=(404, 502, 503, 504))
async def embeddings(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    too_large = f"The request body is larger than {settings.max_body_bytes} bytes."
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLarge(too_large)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(too_large) from None
    req = _decode(body)
    inputs = check(req)
    check_model(request, req.model)  # before the lookup: a key learns nothing of others
    if not request.app[ROUTER].has_model(req.model):
        raise NotFound(f"The model {req.model!r} does not exist.", code="model_not_found",
                       param="model")
    policy = request.app[MODELS].get(req.model)
    expected = req.dimensions if isinstance(req.dimensions, int) else (
        policy.embedding_dimensions if policy is not None else None)
    budget = settings.request_timeout_sec
    hint = request.headers.get("x-stainless-read-timeout")
    if hint:
        # As for chat: an answer after the SDK gave up is work thrown away.
        with contextlib.suppress(ValueError):
            budget = min(budget, max(float(hint) * 0.95, 0.5))
    rid = request[REQUEST_ID]
    answer = await request.app[DISPATCHER].embed(EmbedRequest(
        embed=req, inputs=inputs, request_id=rid, deadline=time.monotonic() + budget,
        passthrough=request.headers, dimensions=expected))
    return web.Response(
        body=encode_response(answer.result, model=req.model,
                             encoding_format=req.encoding_format),
        content_type="application/json",
        headers={"x-request-id": rid, "x-bulwark-provider": answer.provider,
                 "x-bulwark-attempts": str(answer.attempts),
                 "x-bulwark-fallback": answer.fallback})
