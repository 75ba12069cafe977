"""A gateway with jobs on a real port and a real Postgres, for the jobs, idempotency and
webhook tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from bulwark.config import Settings
from service.app import create_app
from tests.conftest import Sim, provider

CHAT: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
#: Fast enough for tests: leases, polls and backoffs in tenths of a second.
FAST = {"BULWARK_JOBS_POLL_SEC": "0.2", "BULWARK_JOBS_LEASE_SEC": "2",
        "BULWARK_JOBS_BACKOFF_BASE_SEC": "0.05", "BULWARK_JOBS_BACKOFF_MAX_SEC": "0.2"}


class Api:
    def __init__(self, server: TestServer, app: web.Application) -> None:
        self.server = server
        self.app = app
        self.base = str(server.make_url("")).rstrip("/")

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with aiohttp.ClientSession() as s, s.request(
                method, f"{self.base}{path}", **kw) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers

    async def submit(self, **body: Any) -> str:
        body.setdefault("request", CHAT)
        status, job, headers = await self.call("POST", "/v1/chat/jobs", json=body)
        assert status == 202, job
        assert headers["Location"] == f"/v1/chat/jobs/{job['id']}"
        return str(job["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        status, body, _ = await self.call("GET", f"/v1/chat/jobs/{job_id}")
        assert status == 200, body
        return dict(body)

    def status_is(self, job_id: str, *statuses: str) -> Callable[[], Awaitable[Any]]:
        async def probe() -> dict[str, Any] | None:
            job = await self.job(job_id)
            return job if job["status"] in statuses else None
        return probe


Start = Callable[..., Awaitable[Api]]


def api_factory(aiohttp_server: Any, pg_clean: str) -> Start:
    """`start(sims, **env)`: the gateway over these simulators (priorities in order)."""
    async def start(sims: list[Sim], *, breaker_threshold: int = 5,
                    admin_token: str | None = None, **env: str) -> Api:
        # One upstream call per attempt (no retries of the provider): counts are exact.
        settings = Settings(database_url=pg_clean, http_backoff_base_ms=0, http_retries=0,
                            cb_fail_threshold=breaker_threshold, admin_token=admin_token)
        app = create_app(settings, [provider(s.name, s.url, priority=i, settings=settings)
                                    for i, s in enumerate(sims, 1)], env={**FAST, **env})
        server = await aiohttp_server(app)
        return Api(server, app)

    return start
