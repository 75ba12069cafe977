"""`/v1/chat/jobs` (durable asynchronous chat), `GET /health/dlq`, and the 202 that a
chat request with `Prefer: respond-async` gets when nothing can answer it now.

These routes do a Postgres round trip by nature — a 202 is given only once the job's row
is committed, and a job's status lives nowhere else — unlike the chat path, which never
waits on Postgres. Without DATABASE_URL they answer 503 `jobs_unavailable`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

import asyncpg
import msgspec
from aiohttp import web

from bulwark import jobstore
from bulwark.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from bulwark.wire import ChatRequest, encoder
from service import idempotency
from service.auth import check_model
from service.bodies import DlqCounts, Job, JobAccepted
from service.chatreq import check_limits, decode_chat
from service.jobs import Jobs
from service.keys import IDEMPOTENCY_RECORD, JOBS, MODELS, REQUEST_ID, ROUTER, SETTINGS
from service.openapi import Body, describe
from service.respond_async import accepted

routes = web.RouteTableDef()

_JOB_ID: Final = re.compile(r"^job_[0-9a-f]{24}$")
# Names of this host as a callback URL may spell them (0.0.0.0 reaches us too); not a bind.
_LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})  # noqa: S104


class JobIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    request: msgspec.Raw
    callback_url: str | None = None
    metadata: dict[str, Any] | None = None


class JobRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """JobIn as the document shows it: `request` is decoded (as a chat body) only after
    the envelope, so that its errors are named `request.…`; it may not stream."""

    request: Annotated[ChatRequest, msgspec.Meta(extra_json_schema={
        "properties": {"stream": {"const": False}}})]
    #: Called (signed) when the job ends; needs the gateway's BULWARK_WEBHOOK_SECRET.
    callback_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#\s]+")] | None = None
    metadata: dict[str, Any] | None = None


_job_in = msgspec.json.Decoder(JobIn)
#: A JSON-escaped NUL (not an escaped backslash before "u0000"): Postgres text and jsonb
#: cannot hold one, so a job carrying it could never be stored.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]*)`")


def _jobs(request: web.Request) -> Jobs:
    jobs = request.app.get(JOBS)
    if jobs is None:
        raise ServiceUnavailable("Jobs need a database, and this gateway runs without one.",
                                 code="jobs_unavailable", should_retry=False)
    return jobs


def idempotency_store(request: web.Request) -> idempotency.IdempotencyStore | None:
    jobs = request.app.get(JOBS)
    return None if jobs is None else jobs.idempotency


def _job_response(rec: asyncpg.Record, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=encoder.encode(jobstore.job_object(rec)),
                        content_type="application/json", headers=headers)


def _envelope(body: bytes) -> JobIn:
    try:
        return _job_in.decode(body)
    except msgspec.ValidationError as err:
        text = str(err)
        m, f = _PATH.search(text), _FIELD.search(text)
        param = ".".join(p for p in (m.group(1) if m else "", f.group(1) if f else "") if p)
        raise InvalidRequest(f"Invalid job: {text}", code="invalid_request",
                             param=param or None) from None
    except msgspec.DecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None


def _nested(err: InvalidRequest) -> InvalidRequest:
    """A chat-body error, with its `param` relative to the job (`request.messages[0]`)."""
    param = f"request.{err.param}" if err.param else "request"
    return InvalidRequest(err.message, code=err.code, param=param)


def _check_callback(request: web.Request, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("callback_url must be an absolute http(s) URL.",
                             code="invalid_callback_url", param="callback_url")
    settings = request.app[SETTINGS]
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest("callback_url has an invalid port.", code="invalid_callback_url",
                             param="callback_url") from None
    ours = {settings.host.lower(), (request.url.host or "").lower(), *_LOCAL_HOSTS}
    our_ports = {settings.port, request.url.port}
    if parts.hostname.lower() in ours and port in our_ports and (
            parts.path == "/admin" or parts.path.startswith("/admin/")):
        # A job must not become a way to make the gateway call its own operator API.
        raise InvalidRequest("callback_url must not point at this gateway's admin API.",
                             code="invalid_callback_url", param="callback_url")
    if request.app[JOBS].signer is None:
        raise InvalidRequest("This gateway has no BULWARK_WEBHOOK_SECRET: callback_url is not "
                             "available.", code="callbacks_unavailable", param="callback_url")


_ACCEPTED = Body(JobAccepted, headers=("Location",), optional_headers=("Idempotent-Replayed",),
                 description="Queued: poll `Location`.")
_JOB = Body(Job)
_JOB_TAGS = ("jobs",)


def _examples(app: web.Application) -> dict[str, object]:
    model = min(app[MODELS].keys(), default="default")
    return {"job": {"request": {"model": model,
                                "messages": [{"role": "user", "content": "Hello!"}]},
                    "metadata": {"ticket": "T-1"}}}


@routes.post("/v1/chat/jobs")
@describe("Submit a chat request as a durable job", tags=_JOB_TAGS,
          request=Body(JobRequest, examples=_examples),
          headers=("Idempotency-Key",), responses={202: _ACCEPTED},
          errors=(404, 409, 422, 503),
          description=("Answered 202 once the job is stored. 409: a request with this "
                       "Idempotency-Key is still running; 422: the key was used with "
                       "another body. See docs/JOBS.md."))
async def create_job(request: web.Request) -> web.StreamResponse:
    if idempotency.HEADER in request.headers:
        return await idempotency.idempotent(request, _create_job, idempotency_store(request),
                                            IDEMPOTENCY_RECORD)
    return await _create_job(request)


async def _create_job(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLarge(f"The request body is larger than {settings.max_body_bytes} bytes.")
    body = await request.read()  # first: an oversize body is a 413 whatever else is wrong
    jobs = _jobs(request)
    job = _envelope(body)
    try:
        chat: ChatRequest = decode_chat(bytes(job.request))
        check_limits(chat, max_messages=settings.max_messages,
                      max_chars=settings.max_message_chars)
    except InvalidRequest as err:
        raise _nested(err) from None
    if _NUL.search(job.request):
        raise InvalidRequest("A job cannot hold NUL characters (\\u0000).",
                             code="invalid_request", param="request")
    if chat.stream:
        raise InvalidRequest("A job's answer is stored, not streamed: leave stream off.",
                             code="invalid_request", param="request.stream")
    check_model(request, chat.model)  # before the lookup, as for chat
    if not request.app[ROUTER].has_model(chat.model):
        raise NotFound(f"The model {chat.model!r} does not exist.", code="model_not_found",
                       param="request.model")
    if job.callback_url is not None:
        _check_callback(request, job.callback_url)
    metadata = None
    if job.metadata is not None:
        metadata = encoder.encode(job.metadata)
        if _NUL.search(metadata):
            raise InvalidRequest("A job cannot hold NUL characters (\\u0000).",
                                 code="invalid_request", param="metadata")
        if len(metadata) > jobs.config.metadata_max_bytes:
            raise PayloadTooLarge(f"metadata is larger than {jobs.config.metadata_max_bytes} "
                                  "bytes of JSON.", code="metadata_too_large", param="metadata")
    rec = await jobs.submit(chat, callback_url=job.callback_url, metadata=metadata,
                            request_id=request[REQUEST_ID])
    return accepted(rec)


def _job_id(request: web.Request) -> str:
    job_id = request.match_info["job_id"]
    if not _JOB_ID.match(job_id):
        raise NotFound(f"No job {job_id[:64]!r}.", code="job_not_found")
    return job_id


@routes.get("/v1/chat/jobs/{job_id}")
@describe("A job's status, and its answer once done", tags=_JOB_TAGS,
          responses={200: _JOB}, errors=(404, 503))
async def get_job(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    job_id = _job_id(request)
    rec = await jobs.db("get job", lambda: jobstore.get_job(jobs.pool, job_id))
    if rec is None:
        raise NotFound(f"No job {job_id!r}.", code="job_not_found")
    return _job_response(rec)


@routes.delete("/v1/chat/jobs/{job_id}")
@describe("Cancel a queued job", tags=_JOB_TAGS, responses={200: _JOB}, errors=(404, 409, 503),
          description="409 `job_not_cancellable` once it runs or has ended.")
async def cancel_job(request: web.Request) -> web.Response:
    jobs = _jobs(request)
    job_id = _job_id(request)
    cancelled, rec = await jobs.db("cancel job", lambda: jobstore.cancel_job(jobs.pool, job_id))
    if rec is None:
        raise NotFound(f"No job {job_id!r}.", code="job_not_found")
    if not cancelled and rec["status"] != "cancelled":
        raise Conflict(f"The job is {rec['status']}; only a queued job can be cancelled.",
                       code="job_not_cancellable")
    return _job_response(rec)


@routes.get("/health/dlq")
@describe("Dead-letter queue counts", tags=("health",), responses={200: DlqCounts},
          errors=(503,))
async def dlq(request: web.Request) -> web.Response:
    """The dead-letter queue's size (a Postgres read, cached for a second)."""
    jobs = request.app.get(JOBS)
    if jobs is None:
        counts: dict[str, Any] = {"dead": 0, "queued": 0, "running": 0,
                                  "oldest_dead_age_sec": None}
    else:
        counts = await jobs.dlq()
    return web.Response(body=encoder.encode(counts), content_type="application/json")
