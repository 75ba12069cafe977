"""Every typed key of the web app and its requests, in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from bulwark.bus import Bus
from bulwark.config import ModelPolicy, Provider, Settings
from bulwark.state import View
from bulwark.telemetry import Tracing
from service.dispatch import Dispatcher
from service.router import Router
from service.streams import OpenStreams
from service.sync import ErrorRecorder, StateSync

SETTINGS = web.AppKey("settings", Settings)
PROVIDERS = web.AppKey("providers", list[Provider])
#: Every served model's `[models.<name>]` policy (defaults where the file has none).
MODELS = web.AppKey("models", dict[str, ModelPolicy])
SESSION = web.AppKey("session", aiohttp.ClientSession)
VIEW = web.AppKey("view", View)
ROUTER = web.AppKey("router", Router)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SYNC = web.AppKey("sync", StateSync)
ERRORS = web.AppKey("errors", ErrorRecorder)
#: Open SSE streams, so that shutdown can end them with an error event, never silently.
STREAMS = web.AppKey("streams", OpenStreams)
#: The state bus, when there is a database (set by the bus's cleanup context).
BUS = web.AppKey("bus", Bus)
#: OpenTelemetry tracing, or None when no OTLP endpoint is configured.
TRACING: web.AppKey[Tracing | None] = web.AppKey("tracing")

REQUEST_ID = web.RequestKey("request_id", str)
