"""Durable chat jobs through the HTTP API: a gateway on a real port, a real Postgres, the
simulator on a socket (issue 6, items 4, 5 and the Prefer: respond-async path)."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest

from bulwark import jobstore
from bulwark.config import Settings
from service.app import create_app
from service.keys import JOBS, ROUTER
from tests.conftest import Sim, SimFactory, provider
from tests.jobsapi import CHAT, Api, Start, api_factory
from tests.procs import until


@pytest.fixture
def api(aiohttp_server: Any, pg_clean: str) -> Start:
    return api_factory(aiohttp_server, pg_clean)


async def test_job_lifecycle_through_the_api(api: Start, sim: SimFactory,
                                             db: asyncpg.Connection) -> None:
    """POST answers 202 with the job object and Location only once the row is committed;
    the worker runs it; GET shows succeeded with an OpenAI chat.completion as result."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    status, body, headers = await gw.call(
        "POST", "/v1/chat/jobs", json={"request": CHAT, "metadata": {"user": "u1"}})
    assert status == 202
    assert set(body) == {"id", "object", "status", "created_at"}
    assert (body["object"], body["status"]) == ("chat.job", "queued")
    assert headers["Location"] == f"/v1/chat/jobs/{body['id']}"
    # 202 means committed: another connection sees the row the moment the answer arrives.
    assert await db.fetchval("select count(*) from chat_jobs where id = $1", body["id"]) == 1
    job = await until(gw.status_is(body["id"], "succeeded"), what="job succeeded")
    assert job["result"]["object"] == "chat.completion"
    assert "alpha" in job["result"]["choices"][0]["message"]["content"]
    assert (job["attempts"], job["provider"], job["metadata"]) == (1, "alpha", {"user": "u1"})
    assert job["updated_at"] >= job["created_at"]
    sent = [e for e in await sim_log(alpha) if e["path"] == "/v1/chat/completions"]
    assert len(sent) == 1 and not sent[0]["body"].get("stream")


async def sim_log(target: Sim) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(target.server.make_url("/_sim/log")) as r:
        data: list[dict[str, Any]] = await r.json()
        return data


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"request": {"model": "default", "messages": [{"role": "robot"}]}}, 400,
     "invalid_request", "request.messages[0].role"),
    ({"request": {**CHAT, "stream": True}}, 400, "invalid_request", "request.stream"),
    ({"request": {**CHAT, "tempurature": 1}}, 400, "invalid_request", "request.tempurature"),
    ({"request": "hi"}, 400, "invalid_request", "request"),
    ({"chat": CHAT}, 400, "invalid_request", "chat"),
    ({}, 400, "invalid_request", "request"),
    ({"request": {**CHAT, "model": "nope"}}, 404, "model_not_found", "request.model"),
    ({"request": CHAT, "callback_url": "ftp://example.com/x"}, 400, "invalid_callback_url",
     "callback_url"),
    ({"request": CHAT, "callback_url": "/relative"}, 400, "invalid_callback_url",
     "callback_url"),
    ({"request": CHAT, "metadata": {"blob": "x" * 20_000}}, 413, "metadata_too_large",
     "metadata"),
])
async def test_bad_job_is_refused_before_it_is_stored(
        api: Start, sim: SimFactory, db: asyncpg.Connection, body: dict[str, Any], status: int,
        code: str, param: str) -> None:
    """A job that is not a valid chat request (or has a bad callback or oversized metadata)
    gets an OpenAI-shaped error naming the field, and nothing is stored."""
    gw = await api([await sim("alpha")], BULWARK_WEBHOOK_SECRET="s3cret")
    got, err, _ = await gw.call("POST", "/v1/chat/jobs", json=body)
    assert got == status, err
    assert (err["error"]["code"], err["error"]["param"]) == (code, param)
    assert await db.fetchval("select count(*) from chat_jobs") == 0


async def test_callback_to_our_own_admin_api_is_refused(api: Start, sim: SimFactory) -> None:
    """A callback_url pointing at this gateway's /admin is a 400; elsewhere on it is fine."""
    gw = await api([await sim("alpha")], BULWARK_WEBHOOK_SECRET="s3cret")
    port = gw.server.port
    for url in (f"http://127.0.0.1:{port}/admin/keys", f"http://localhost:{port}/admin"):
        status, err, _ = await gw.call("POST", "/v1/chat/jobs",
                                       json={"request": CHAT, "callback_url": url})
        assert (status, err["error"]["code"]) == (400, "invalid_callback_url")
    status, _, _ = await gw.call("POST", "/v1/chat/jobs", json={
        "request": CHAT, "callback_url": f"http://127.0.0.1:{port}/hooks/admin"})
    assert status == 202


async def test_unknown_job_is_404(api: Start, sim: SimFactory) -> None:
    """GET and DELETE of an unknown or malformed id answer 404 job_not_found."""
    gw = await api([await sim("alpha")])
    for method in ("GET", "DELETE"):
        for job_id in ("job_" + "0" * 24, "nope", "job_../../admin"):
            status, err, _ = await gw.call(method, f"/v1/chat/jobs/{job_id}")
            assert (status, err["error"]["code"]) == (404, "job_not_found")


async def test_cancel_only_before_running(api: Start, sim: SimFactory) -> None:
    """DELETE cancels a queued job (which then never runs) and is repeatable; a running or
    finished job answers 409."""
    alpha = await sim("alpha")
    gw = await api([alpha], BULWARK_JOBS_CONCURRENCY="1")
    await alpha.script(steps=[{"latency_ms": 1500}])
    running = await gw.submit()
    await until(gw.status_is(running, "running"), what="first job running")
    waiting = await gw.submit()  # the one slot is taken: it stays queued
    status, job, _ = await gw.call("DELETE", f"/v1/chat/jobs/{waiting}")
    assert (status, job["status"]) == (200, "cancelled")
    status, job, _ = await gw.call("DELETE", f"/v1/chat/jobs/{waiting}")
    assert (status, job["status"]) == (200, "cancelled")
    status, err, _ = await gw.call("DELETE", f"/v1/chat/jobs/{running}")
    assert (status, err["error"]["code"]) == (409, "job_not_cancellable")
    await until(gw.status_is(running, "succeeded"), what="first job done")
    status, err, _ = await gw.call("DELETE", f"/v1/chat/jobs/{running}")
    assert status == 409
    assert (await gw.job(waiting))["status"] == "cancelled"
    assert (await alpha.stats())["chat"] == 1


async def test_callers_own_error_fails_the_job_at_once(api: Start, sim: SimFactory) -> None:
    """An upstream 400 (the caller's error) makes the job failed after one attempt, with the
    error; it is not retried."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    await alpha.script(then={"status": 400})
    job = await until(gw.status_is(await gw.submit(), "failed"), what="failed")
    assert job["attempts"] == 1
    assert job["error"]["type"] == "invalid_request_error"
    assert "result" not in job
    assert (await alpha.stats())["chat"] == 1


async def test_retryable_failures_end_dead_then_retry_dead_replays(
        api: Start, sim: SimFactory, pg_clean: str) -> None:
    """503s are retried with backoff until the attempts are spent; the job is then dead with
    its reason, counted by /health/dlq; retry_dead puts it back and it succeeds."""
    alpha = await sim("alpha")
    gw = await api([alpha], BULWARK_JOBS_MAX_ATTEMPTS="3", breaker_threshold=100)
    await alpha.script(then={"status": 503})
    job_id = await gw.submit()
    job = await until(gw.status_is(job_id, "dead"), what="dead")
    assert job["attempts"] == 3
    assert job["error"]["code"] == "no_provider_available"
    assert "given up after 3 attempt(s)" in job["error"]["message"]
    assert (await alpha.stats())["chat"] == 3

    async def dlq_has_one() -> dict[str, Any] | None:
        _, body, _ = await gw.call("GET", "/health/dlq")
        return body if body["dead"] == 1 else None
    counts = await until(dlq_has_one, what="/health/dlq counts the dead job")
    assert set(counts) == {"dead", "queued", "running", "oldest_dead_age_sec"}
    assert counts["oldest_dead_age_sec"] >= 0

    conn = await asyncpg.connect(pg_clean)
    try:
        listed = await jobstore.list_dead(conn, 10, model="default")
        assert [j["id"] for j in listed] == [job_id]
        assert await jobstore.list_dead(conn, 10, model="other") == []
        await alpha.script(then={})
        assert await jobstore.retry_dead(conn, job_id)
        assert not await jobstore.retry_dead(conn, job_id)  # no longer dead
    finally:
        await conn.close()
    job = await until(gw.status_is(job_id, "succeeded"), what="replayed job succeeds")
    assert (job["attempts"], job["replays"]) == (1, 1)


async def test_purge_dead(api: Start, sim: SimFactory, pg_clean: str) -> None:
    """purge_dead deletes dead jobs (by model and age) and nothing else."""
    alpha = await sim("alpha")
    gw = await api([alpha], BULWARK_JOBS_MAX_ATTEMPTS="1", breaker_threshold=100)
    await alpha.script(then={"status": 503})
    dead = await gw.submit()
    await until(gw.status_is(dead, "dead"), what="dead")
    await alpha.script(then={})
    alive = await gw.submit()
    await until(gw.status_is(alive, "succeeded"), what="succeeded")
    conn = await asyncpg.connect(pg_clean)
    try:
        assert await jobstore.purge_dead(conn, older_than_sec=3600) == 0
        assert await jobstore.purge_dead(conn, model="other") == 0
        assert await jobstore.purge_dead(conn, model="default") == 1
        assert await conn.fetchval("select array_agg(id) from chat_jobs") == [alive]
    finally:
        await conn.close()


async def test_jobs_wait_while_no_provider_can_answer(api: Start, sim: SimFactory) -> None:
    """While every provider of the model is open, a job is not attempted at all (no attempt
    spent, no upstream call); it runs as soon as one closes."""
    alpha = await sim("alpha")
    gw = await api([alpha])
    breaker = gw.app[ROUTER].runtimes["alpha"].breaker
    breaker.force_open("test", open_for=600)
    jobs = gw.app[JOBS]
    job_id = await gw.submit()
    rounds = jobs.claim_rounds
    await until(lambda: _rounds_past(jobs, rounds + 2), what="two claims passed it by")
    job = await gw.job(job_id)
    assert (job["status"], job["attempts"]) == ("queued", 0)
    assert (await alpha.stats())["chat"] == 0
    breaker.reset("test")
    jobs.wake()
    job = await until(gw.status_is(job_id, "succeeded"), what="runs after recovery")
    assert job["attempts"] == 1
    assert (await alpha.stats())["chat"] == 1


async def _rounds_past(jobs: Any, n: int) -> bool:
    return bool(jobs.claim_rounds >= n)


async def test_prefer_respond_async_turns_503_into_a_job(api: Start, sim: SimFactory) -> None:
    """With every provider failing, a chat with Prefer: respond-async answers 202 with the
    job, Location, Preference-Applied and x-bulwark-fallback: queued; the answer arrives in
    the job once the provider recovers. Without the header it is today's 503."""
    alpha = await sim("alpha")
    gw = await api([alpha], breaker_threshold=100)
    await alpha.script(then={"status": 503})
    status, err, _ = await gw.call("POST", "/v1/chat/completions", json=CHAT)
    assert (status, err["error"]["code"]) == (503, "no_provider_available")
    for body in (CHAT, {**CHAT, "stream": True}):
        status, job, headers = await gw.call("POST", "/v1/chat/completions", json=body,
                                             # The first job's answer is stored:
                                             # a stored answer would come before a job.
                                             headers={"Prefer": "respond-async, wait=5",
                                                      "Cache-Control": "no-cache"})
        assert status == 202, job
        assert (job["object"], job["status"]) == ("chat.job", "queued")
        assert headers["Location"] == f"/v1/chat/jobs/{job['id']}"
        assert headers["Preference-Applied"] == "respond-async"
        assert headers["x-bulwark-fallback"] == "queued"
        await alpha.script(then={})
        done = await until(gw.status_is(job["id"], "succeeded"), what="job answered")
        assert done["result"]["object"] == "chat.completion"
        await alpha.script(then={"status": 503})


async def test_prefer_is_ignored_when_someone_answers(api: Start, sim: SimFactory) -> None:
    """Prefer: respond-async changes nothing when a provider answers: a normal 200."""
    gw = await api([await sim("alpha")])
    status, body, headers = await gw.call("POST", "/v1/chat/completions", json=CHAT,
                                          headers={"Prefer": "respond-async"})
    assert (status, body["object"], headers["x-bulwark-fallback"]) == (
        200, "chat.completion", "none")


async def test_without_a_database_jobs_are_unavailable(aiohttp_server: Any,
                                                      sim: SimFactory) -> None:
    """Without DATABASE_URL: /v1/chat/jobs is a 503 jobs_unavailable, /health/dlq zeros, and
    Prefer: respond-async leaves a 503 a 503."""
    alpha = await sim("alpha")
    app = create_app(Settings(http_backoff_base_ms=0, http_retries=0),
                     [provider("alpha", alpha.url)], env={})
    gw = Api(await aiohttp_server(app), app)
    status, err, _ = await gw.call("POST", "/v1/chat/jobs", json={"request": CHAT})
    assert (status, err["error"]["code"]) == (503, "jobs_unavailable")
    status, body, _ = await gw.call("GET", "/health/dlq")
    assert (status, body["dead"]) == (200, 0)
    await alpha.script(then={"status": 503})
    status, err, _ = await gw.call("POST", "/v1/chat/completions", json=CHAT,
                                   headers={"Prefer": "respond-async"})
    assert (status, err["error"]["code"]) == (503, "no_provider_available")


async def test_dlq_through_the_admin_api(api: Start, sim: SimFactory, pg_clean: str) -> None:
    """The operator lists dead jobs, retries one (it then succeeds) and purges the rest; each
    action is audited; bad input and unknown ids are clear errors."""
    token = "adm-dlq-0123456789-abcdef"
    auth = {"Authorization": f"Bearer {token}"}
    alpha = await sim("alpha")
    gw = await api([alpha], BULWARK_JOBS_MAX_ATTEMPTS="1", breaker_threshold=100,
                   admin_token=token)
    await alpha.script(then={"status": 503})
    first, second = await gw.submit(), await gw.submit()
    for job_id in (first, second):
        await until(gw.status_is(job_id, "dead"), what="dead")
    status, body, _ = await gw.call("GET", "/admin/reliability/dlq", headers=auth)
    assert status == 200, body
    assert body["dead"] == 2 and {j["id"] for j in body["jobs"]} == {first, second}
    status, _, _ = await gw.call("GET", "/admin/reliability/dlq")
    assert status == 401
    status, body, _ = await gw.call("GET", "/admin/reliability/dlq?limit=0", headers=auth)
    assert (status, body["error"]["param"]) == (400, "limit")

    await alpha.script(then={})
    status, body, _ = await gw.call("POST", f"/admin/reliability/dlq/{first}/retry",
                                    headers=auth, json={"reason": "provider is back"})
    assert (status, body["status"]) == (200, "queued")
    await until(gw.status_is(first, "succeeded"), what="retried job answered")
    status, body, _ = await gw.call("POST", f"/admin/reliability/dlq/{first}/retry",
                                    headers=auth)
    assert (status, body["error"]["code"]) == (404, "job_not_found")

    status, body, _ = await gw.call("POST", "/admin/reliability/dlq/purge", headers=auth,
                                    json={"model": "default"})
    assert (status, body["error"]["param"]) == (400, "reason")
    status, body, _ = await gw.call("POST", "/admin/reliability/dlq/purge", headers=auth,
                                    json={"reason": "obsolete", "model": "default"})
    assert (status, body["purged"]) == (200, 1)
    status, body, _ = await gw.call("GET", f"/v1/chat/jobs/{second}")
    assert (status, body["error"]["code"]) == (404, "job_not_found")
    conn = await asyncpg.connect(pg_clean)
    try:
        actions = [r["action"] for r in await conn.fetch(
            "select action from admin_audit order by id")]
    finally:
        await conn.close()
    assert actions == ["dlq.retry", "dlq.purge"]
