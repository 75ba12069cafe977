"""Every typed key of the web app and its requests, in one place."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from bulwark.cache import ResponseCache
from bulwark.config import ModelPolicy, Provider, Settings
from bulwark.degradation import Degradation
from bulwark.state import View
from service.dispatch import Dispatcher
from service.observers import RecentFailures
from service.router import Router
from service.status_board import StatusBoard
from service.streams import OpenStreams
from service.sync import ErrorRecorder, StateSync
from service.wshub import WsHub

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

REQUEST_ID = web.RequestKey("request_id", str)
