"""`POST /v1/feedback`: validated, bounded, stored in Postgres before the 201 (503 when it
cannot be), and summarised for the reliability report."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDict

from bulwark.bus import Bus
from bulwark.config import Settings
from bulwark.feedback import FeedbackRequest, FeedbackWriter, feedback_summary
from bulwark.state import View
from tests.conftest import Gateway, GatewayFactory, SimFactory, provider
from tests.procs import until

pytestmark = pytest.mark.slow


async def _gateway(gateway: GatewayFactory, sim: SimFactory, dsn: str | None) -> Gateway:
    alpha = await sim("alpha")
    return await gateway([provider("alpha", alpha.url)],
                         settings=Settings(http_backoff_base_ms=0, database_url=dsn))


async def _post(gw: Gateway, body: Any = None, *, data: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], Any]:
    async with aiohttp.ClientSession() as s, s.post(
            gw.server.make_url("/v1/feedback"), json=body, data=data, headers=headers) as r:
        return r.status, r.headers.copy(), await r.json(content_type=None)


async def test_feedback_is_stored_before_the_201(gateway: GatewayFactory, sim: SimFactory,
                                                 db: asyncpg.Connection, pg_clean: str) -> None:
    """A 201 answers the stored object, and the row is there: request id, scale, rating,
    normalised score, comment, tags; the client key id stays NULL without keys."""
    gw = await _gateway(gateway, sim, pg_clean)
    status, headers, body = await _post(gw, {
        "request_id": "req_abc", "rating": 4, "scale": "stars", "comment": "Good, slow.",
        "tags": ["slow", "helpful"]})
    assert status == 201, body
    assert headers["x-request-id"]
    assert body["object"] == "feedback"
    assert body["id"].startswith("fb_")
    assert (body["request_id"], body["rating"], body["scale"], body["score"]) == (
        "req_abc", 4, "stars", 0.75)
    assert (body["comment"], body["tags"]) == ("Good, slow.", ["slow", "helpful"])
    row = await db.fetchrow("SELECT * FROM feedback WHERE id = $1", int(body["id"][3:]))
    assert row is not None
    assert (row["request_id"], row["scale"], row["rating"], row["comment"],
            row["tags"], row["client_key_id"]) == (
        "req_abc", "stars", 4, "Good, slow.", ["slow", "helpful"], None)
    assert abs(row["at"].timestamp() - body["created_at"]) < 1


@pytest.mark.parametrize(("rating", "scale", "stored_scale", "score"), [
    (1, None, "thumbs", 1.0), (0, None, "thumbs", 0.5), (-1, None, "thumbs", 0.0),
    (2, None, "stars", 0.25), (5, None, "stars", 1.0), (1, "stars", "stars", 0.0),
    (1, "thumbs", "thumbs", 1.0),
])
async def test_the_scale_is_inferred_or_given(gateway: GatewayFactory, sim: SimFactory,
                                              pg_clean: str, rating: int, scale: str | None,
                                              stored_scale: str, score: float) -> None:
    """Without `scale`, -1/0/1 are thumbs and 2..5 stars; with it, 1 means what it says."""
    gw = await _gateway(gateway, sim, pg_clean)
    body: dict[str, Any] = {"request_id": "req_1", "rating": rating}
    if scale is not None:
        body["scale"] = scale
    status, _, out = await _post(gw, body)
    assert status == 201, out
    assert (out["scale"], out["score"]) == (stored_scale, score)


@pytest.mark.parametrize(("body", "param"), [
    ({"rating": 1}, "request_id"),
    ({"request_id": "r"}, "rating"),
    ({"request_id": "r", "rating": 6}, "rating"),
    ({"request_id": "r", "rating": -2}, "rating"),
    ({"request_id": "r", "rating": 1.5}, "rating"),
    ({"request_id": "r", "rating": "1"}, "rating"),
    ({"request_id": "r", "rating": 0, "scale": "stars"}, "rating"),
    ({"request_id": "r", "rating": 4, "scale": "thumbs"}, "rating"),
    ({"request_id": "r", "rating": 1, "scale": "percent"}, "scale"),
    ({"request_id": "r", "rating": 1, "comment": "x" * 4001}, "comment"),
    ({"request_id": "r", "rating": 1, "comment": "a\u0000b"}, "comment"),
    ({"request_id": "r", "rating": 1, "tags": ["t"] * 17}, "tags"),
    ({"request_id": "r", "rating": 1, "tags": ["x" * 65]}, "tags[0]"),
    ({"request_id": "r", "rating": 1, "tags": [""]}, "tags[0]"),
    ({"request_id": "r" * 129, "rating": 1}, "request_id"),
    ({"request_id": "r\u00e9", "rating": 1}, "request_id"),
    ({"request_id": "r", "rating": 1, "stars": 5}, "stars"),
])
async def test_a_bad_body_is_a_400_naming_the_field(gateway: GatewayFactory, sim: SimFactory,
                                                    db: asyncpg.Connection, pg_clean: str,
                                                    body: dict[str, Any], param: str) -> None:
    """Every field is validated; the error is OpenAI-shaped and names the field; nothing
    is stored."""
    gw = await _gateway(gateway, sim, pg_clean)
    status, _, out = await _post(gw, body)
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["param"] == param, out
    assert await db.fetchval("SELECT count(*) FROM feedback") == 0


async def test_a_whole_float_rating_is_an_integer(gateway: GatewayFactory, sim: SimFactory,
                                                  pg_clean: str) -> None:
    """`4.0` is an integer in JSON (and in the document's JSON Schema): accepted as 4."""
    gw = await _gateway(gateway, sim, pg_clean)
    status, _, out = await _post(gw, data=b'{"request_id": "r", "rating": 4.0}',
                                 headers={"Content-Type": "application/json"})
    assert status == 201, out
    assert out["rating"] == 4


async def test_not_json_is_a_400(gateway: GatewayFactory, sim: SimFactory, pg_clean: str) -> None:
    """A body that is not JSON is a 400 invalid_json."""
    gw = await _gateway(gateway, sim, pg_clean)
    status, _, out = await _post(gw, data=b"{nope", headers={"Content-Type": "application/json"})
    assert (status, out["error"]["code"]) == (400, "invalid_json")


async def test_an_oversize_body_is_a_413(gateway: GatewayFactory, sim: SimFactory,
                                         pg_clean: str) -> None:
    """Feedback bodies are bounded at 32 KiB, with or without Content-Length."""
    gw = await _gateway(gateway, sim, pg_clean)
    big = b'{"request_id": "r", "rating": 1, "comment": "' + b"x" * 40_000 + b'"}'
    status, _, out = await _post(gw, data=big, headers={"Content-Type": "application/json"})
    assert (status, out["error"]["code"]) == (413, "request_too_large")

    async def chunks() -> Any:
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    status, _, out = await _post(gw, data=chunks(), headers={"Content-Type": "application/json"})
    assert (status, out["error"]["code"]) == (413, "request_too_large")


async def test_without_a_database_it_is_a_503(gateway: GatewayFactory, sim: SimFactory) -> None:
    """A gateway run without DATABASE_URL cannot store feedback: 503, and no Retry-After
    (retrying will not help)."""
    gw = await _gateway(gateway, sim, None)
    status, headers, out = await _post(gw, {"request_id": "r", "rating": 1})
    assert (status, out["error"]["code"]) == (503, "feedback_unavailable")
    assert "Retry-After" not in headers


async def test_an_unreachable_database_is_a_503_with_retry_after(
        gateway: GatewayFactory, sim: SimFactory) -> None:
    """With Postgres unreachable the answer is 503 with Retry-After, never a 201 for
    feedback that was not stored, and never a 500."""
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = await _gateway(gateway, sim, f"postgresql://nobody@127.0.0.1:{port}/none")
    status, headers, out = await _post(gw, {"request_id": "r", "rating": 1})
    assert (status, out["error"]["code"]) == (503, "feedback_unavailable")
    assert headers["Retry-After"] == "5"


async def test_summary_for_the_reliability_report(db: asyncpg.Connection) -> None:
    """feedback_summary counts thumbs and stars, averages the 0..1 score and the stars,
    ranks tags, and leaves out what is older than the window."""
    rows = [("thumbs", 1, 1.0, None, ["fast"]), ("thumbs", -1, 0.0, "wrong", ["wrong"]),
            ("thumbs", 0, 0.5, "", []), ("stars", 4, 0.75, "ok", ["wrong", "slow"]),
            ("stars", 2, 0.25, None, ["wrong"])]
    for scale, rating, score, comment, tags in rows:
        await db.execute("INSERT INTO feedback (request_id, scale, rating, score, comment, tags)"
                         " VALUES ('r', $1, $2, $3, $4, $5)", scale, rating, score, comment, tags)
    await db.execute("INSERT INTO feedback (request_id, scale, rating, score, tags, at)"
                     " VALUES ('old', 'thumbs', -1, 0, '{old}', now() - interval '2 hours')")
    s = await feedback_summary(db, 3600)
    assert (s.count, s.with_comment) == (5, 2)
    assert s.score_mean == pytest.approx(0.5)
    assert (s.thumbs.up, s.thumbs.neutral, s.thumbs.down) == (1, 1, 1)
    assert (s.stars.count, s.stars.mean) == (2, 3.0)
    assert [(t.tag, t.count) for t in s.top_tags] == [("wrong", 3), ("fast", 1), ("slow", 1)]
    await db.execute("UPDATE feedback SET at = at - interval '3 hours'")
    empty = await feedback_summary(db, 3600)
    assert (empty.count, empty.score_mean, empty.top_tags) == (0, None, [])


async def test_feedback_never_takes_the_whole_bus_pool(db: asyncpg.Connection,
                                                       pg_clean: str) -> None:
    """Feedback is written one INSERT at a time: while one is stuck (the table locked),
    the next ones give up within the bound (not stored: the route's 503) and the bus's own
    writes still go through its other connection."""
    fb = FeedbackRequest(request_id="r", rating=1)
    async with Bus(pg_clean, View(), name="feedback-test") as bus:
        writer = FeedbackWriter(bus, timeout_sec=1.0)
        async with db.transaction():
            await db.execute("LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE")
            stuck = asyncio.create_task(writer.store(fb))
            waiting = asyncio.create_task(writer.store(fb))

            async def lock_waiters() -> int:
                # Statistics views are a snapshot per transaction: take a fresh one.
                await db.execute("SELECT pg_stat_clear_snapshot()")
                return int(await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%INSERT INTO feedback%'"))

            # The first INSERT is in, holding a connection; the second waits for its turn.
            await until(lock_waiters, within=5, what="the first INSERT waiting on the lock")
            assert (writer.writing, writer.queued) == (1, 1)
            assert await bus.put_fleet("test/feedback", {"ok": True}, source="t") is not None
            assert await lock_waiters() == 1
            assert await stuck is None
            assert await waiting is None
        stored = await writer.store(fb)
        assert stored is not None
    assert await db.fetchval("SELECT count(*) FROM feedback") == 1
