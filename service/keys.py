"""Every typed key of the web app and its requests, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from bulwark.bus import Bus
from bulwark.cache import ResponseCache
from bulwark.clientkeys import KeyRecord
from bulwark.config import ModelPolicy, Provider, Settings
from bulwark.degradation import Degradation
from bulwark.feedback import FeedbackWriter
from bulwark.http1 import Http1
from bulwark.state import View
from bulwark.telemetry import Tracing
from service.cors import Cors
from service.dispatch import Dispatcher
from service.jobs import Jobs
from service.observers import RecentFailures
from service.ratelimit import Meter
from service.router import Router
from service.status_board import StatusBoard
from service.streams import OpenStreams
from service.sync import ErrorRecorder, StateSync
from service.wshub import WsHub

if TYPE_CHECKING:
    from service.auth import Guard

SETTINGS = web.AppKey("settings", Settings)
PROVIDERS = web.AppKey("providers", list[Provider])
#: Every served model's `[models.<name>]` policy (defaults where the file has none).
MODELS = web.AppKey("models", dict[str, ModelPolicy])
#: Absent without DATABASE_URL: feedback is then not stored (503).
FEEDBACK = web.AppKey("feedback", FeedbackWriter)
#: The OpenAPI document (service/openapi.py), encoded once at start-up.
OPENAPI = web.AppKey("openapi", bytes)
#: Present only when BULWARK_CORS_ORIGINS is set (service/cors.py).
CORS = web.AppKey("cors", Cors)
SESSION = web.AppKey("session", aiohttp.ClientSession)
HTTP1 = web.AppKey("http1", Http1)
VIEW = web.AppKey("view", View)
ROUTER = web.AppKey("router", Router)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SYNC = web.AppKey("sync", StateSync)
ERRORS = web.AppKey("errors", ErrorRecorder)
#: This process's recent upstream failures by class (the error mix of /health/detailed).
RECENT_FAILURES = web.AppKey("recent_failures", RecentFailures)
#: The status page's snapshot and its live streams (/status, /status/events).
STATUS = web.AppKey("status", StatusBoard)
#: Open SSE streams, so that shutdown can end them with an error event, never silently.
STREAMS = web.AppKey("streams", OpenStreams)
#: Stored answers (LRU in front of Postgres), for when nothing live can answer.
CACHE = web.AppKey("cache", ResponseCache)
#: The fleet's degradation level as this process applies it.
DEGRADATION = web.AppKey("degradation", Degradation)
#: WebSocket chat: open sockets, their answers in flight, bus fan-out, the answer store.
WS = web.AppKey("ws", WsHub)

#: The state bus, when a database is configured (admin writes need it).
BUS = web.AppKey("bus", Bus)
#: OpenTelemetry tracing, or None when no OTLP endpoint is configured.
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")
#: Client keys, rate limits and the process bulkhead. Typed by annotation only: Guard
#: sets the request keys below, so importing it here would be circular.
GUARD: web.AppKey[Guard] = web.AppKey("guard")

#: Durable jobs, the DLQ and idempotency keys (only with DATABASE_URL).
JOBS = web.AppKey("jobs", Jobs)

REQUEST_ID = web.RequestKey("request_id", str)
#: The client key that authenticated this request (absent while keys are off): cache,
#: idempotency and jobs scope by `request[CLIENT_KEY].id`.
CLIENT_KEY = web.RequestKey("client_key", KeyRecord)
#: The x-ratelimit-* headers of a keyed request, for every response it gets.
RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])
#: Tokens a keyed request with a tokens-per-minute limit used, charged when it ends.
METER = web.RequestKey("meter", Meter)
#: The SSE bytes of a stream as written, for an Idempotency-Key to store (service/idempotency).
IDEMPOTENCY_RECORD = web.RequestKey("idempotency_record", list[bytes])
