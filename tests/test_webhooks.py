"""Webhooks of finished jobs: a real receiving aiohttp server verifies the Standard Webhooks
signature on its own; a 500 is retried; every attempt is recorded (issue 6, item 6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from bulwark.webhooks import Signer
from tests.conftest import SimFactory
from tests.jobsapi import Start, api_factory
from tests.procs import until

SECRET_BYTES = b"a receiver's shared secret, 32 b"
SECRET = "whsec_" + base64.b64encode(SECRET_BYTES).decode()


@pytest.fixture
def api(aiohttp_server: Any, pg_clean: str) -> Start:
    return api_factory(aiohttp_server, pg_clean)


def verify(headers: Any, body: bytes) -> bool:
    """What a receiver does, written from the spec rather than with our Signer."""
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    expected = base64.b64encode(hmac.new(
        SECRET_BYTES, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in headers["webhook-signature"].split()
               if s.startswith("v1,")]
    fresh = abs(time.time() - int(ts)) < 300
    return fresh and any(hmac.compare_digest(expected, sig) for sig in offered)


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen: list[tuple[dict[str, str], bytes, bool]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((dict(request.headers), body, verify(request.headers, body)))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 300 else "busy")


async def receiver(aiohttp_server: Any, statuses: list[int]) -> tuple[Receiver, str]:
    rec = Receiver(statuses)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = await aiohttp_server(app)
    return rec, str(server.make_url("/hook"))


WEBHOOK_ENV = {"BULWARK_WEBHOOK_SECRET": SECRET, "BULWARK_WEBHOOK_BACKOFF_SEC": "0.05"}


async def test_finished_job_is_posted_signed_and_retried_after_a_500(
        api: Start, sim: SimFactory, aiohttp_server: Any, db: asyncpg.Connection) -> None:
    """The callback gets the succeeded job once final, signed per Standard Webhooks; a 500
    is retried with the same webhook-id; both attempts are rows in webhook_deliveries."""
    rec, url = await receiver(aiohttp_server, [500])
    gw = await api([await sim("alpha")], **WEBHOOK_ENV)
    job_id = await gw.submit(callback_url=url, metadata={"order": "42"})

    async def delivered() -> bool:
        return bool(await db.fetchval(
            "select hook_state = 'delivered' from chat_jobs where id = $1", job_id))
    await until(delivered, what="webhook delivered")
    assert len(rec.seen) == 2
    (h1, b1, ok1), (h2, b2, ok2) = rec.seen
    assert ok1 and ok2
    assert h1["webhook-id"] == h2["webhook-id"] == f"msg_{job_id}_0"
    assert b1 == b2
    payload = json.loads(b2)
    assert payload["type"] == "chat.job.succeeded"
    assert payload["data"]["id"] == job_id
    assert payload["data"]["status"] == "succeeded"
    assert payload["data"]["metadata"] == {"order": "42"}
    assert payload["data"]["result"]["object"] == "chat.completion"
    rows = await db.fetch("select attempt, status, webhook_id from webhook_deliveries "
                          "where job_id = $1 order by attempt", job_id)
    assert [(r["attempt"], r["status"], r["webhook_id"]) for r in rows] == [
        (1, 500, f"msg_{job_id}_0"), (2, 200, f"msg_{job_id}_0")]


async def test_a_refusing_receiver_is_not_retried(
        api: Start, sim: SimFactory, aiohttp_server: Any, db: asyncpg.Connection) -> None:
    """A 4xx other than 408/425/429 ends the delivery as failed after one attempt; the
    failed job's webhook carries its error."""
    rec, url = await receiver(aiohttp_server, [410])
    alpha = await sim("alpha")
    gw = await api([alpha], **WEBHOOK_ENV)
    await alpha.script(then={"status": 400})
    job_id = await gw.submit(callback_url=url)

    async def settled() -> str | None:
        state = await db.fetchval("select hook_state from chat_jobs where id = $1", job_id)
        return state if state in ("delivered", "failed") else None
    assert await until(settled, what="webhook settled") == "failed"
    assert len(rec.seen) == 1
    payload = json.loads(rec.seen[0][1])
    assert payload["type"] == "chat.job.failed"
    assert payload["data"]["error"]["type"] == "invalid_request_error"
    assert await db.fetchval("select count(*) from webhook_deliveries") == 1


async def test_callback_needs_a_configured_secret(api: Start, sim: SimFactory) -> None:
    """Without BULWARK_WEBHOOK_SECRET a job with a callback_url is refused (400)."""
    gw = await api([await sim("alpha")])
    status, err, _ = await gw.call("POST", "/v1/chat/jobs", json={
        "request": {"model": "default", "messages": [{"role": "user", "content": "x"}]},
        "callback_url": "https://example.com/hook"})
    assert (status, err["error"]["code"]) == (400, "callbacks_unavailable")


def test_signer_matches_the_spec_and_hides_its_secret() -> None:
    """Our Signer produces what an independent verifier accepts, for a whsec_ secret; its
    repr never shows the secret."""
    signer = Signer(SECRET)
    body = b'{"type":"chat.job.succeeded"}'
    headers = signer.headers("msg_1", body)
    assert verify(headers, body)
    assert not verify({**headers, "webhook-id": "msg_2"}, body)
    assert SECRET not in repr(signer) and "whsec" not in repr(signer)
