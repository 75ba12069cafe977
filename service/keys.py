"""Every typed key of the web app and its requests, in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from bulwark.config import ModelPolicy, Provider, Settings
from bulwark.feedback import FeedbackWriter
from bulwark.state import View
from service.cors import Cors
from service.dispatch import Dispatcher
from service.router import Router
from service.streams import OpenStreams
from service.sync import ErrorRecorder, StateSync

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
VIEW = web.AppKey("view", View)
ROUTER = web.AppKey("router", Router)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SYNC = web.AppKey("sync", StateSync)
ERRORS = web.AppKey("errors", ErrorRecorder)
#: Open SSE streams, so that shutdown can end them with an error event, never silently.
STREAMS = web.AppKey("streams", OpenStreams)

REQUEST_ID = web.RequestKey("request_id", str)
