"""WebSocket chat at GET /v1/ws, in process: a real aiohttp server, simulators on sockets,
aiohttp's WebSocket client and the `websockets` library as an outside client."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from bulwark.bus import Bus
from bulwark.config import Settings
from bulwark.sim import reply_text
from bulwark.state import View
from service.keys import WS
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider
from tests.pg import eventually

MSG: Any = [{"role": "user", "content": "Hi"}]


def chat(cid: str, **body: Any) -> dict[str, Any]:
    return {"type": "chat", "id": cid,
            "request": {"model": "default", "messages": MSG, **body}}


def ws_url(gw: Gateway, query: str = "") -> str:
    return str(gw.server.make_url("/v1/ws")).replace("http", "ws", 1) + query


async def two(sim: SimFactory, gateway: GatewayFactory, settings: Settings | None = None,
              **p1: Any) -> tuple[Sim, Sim, Gateway]:
    alpha, beta = await sim("alpha"), await sim("beta")
    providers = [provider("alpha", alpha.url, priority=1, **p1),
                 provider("beta", beta.url, priority=2)]
    return alpha, beta, await gateway(providers, settings=settings)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def frames_until(ws: aiohttp.ClientWebSocketResponse, done: set[str],
                       ) -> list[dict[str, Any]]:
    """Frames received until every id in `done` has had its done or error frame."""
    out: list[dict[str, Any]] = []
    left = set(done)
    while left:
        msg = await asyncio.wait_for(ws.receive(), 20)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame = json.loads(msg.data)
        out.append(frame)
        if frame["type"] in ("done", "error") and frame.get("id") in left:
            left.discard(frame["id"])
    return out


def text_of(frames: list[dict[str, Any]], cid: str) -> str:
    return "".join(c["delta"].get("content") or ""
                   for f in frames if f["type"] == "delta" and f["id"] == cid
                   for c in f["chunk"]["choices"])


def only(frames: list[dict[str, Any]], kind: str, cid: str) -> dict[str, Any]:
    found = [f for f in frames if f["type"] == kind and f.get("id") == cid]
    assert len(found) == 1, frames
    return found[0]


async def test_two_requests_stream_deltas_then_done(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession) -> None:
    """Two chats in flight on one socket: each is acked, streams its deltas (OpenAI chunks)
    and ends with a done frame carrying provider, attempts, fallback and usage."""
    _, _, gw = await two(sim, gateway)
    async with session.ws_connect(ws_url(gw)) as ws:
        await ws.send_json(chat("a"))
        await ws.send_json(chat("b", max_tokens=5))
        frames = await frames_until(ws, {"a", "b"})
    assert text_of(frames, "a") == reply_text("alpha")
    assert text_of(frames, "b") == reply_text("alpha", 5)
    for cid in ("a", "b"):
        ack = only(frames, "ack", cid)
        assert len(ack["session"]) >= 16
        assert frames.index(ack) < frames.index(only(frames, "done", cid))
        done = only(frames, "done", cid)
        assert (done["provider"], done["attempts"], done["fallback"]) == ("alpha", 1, "none")
        assert done["usage"]["completion_tokens"] > 0
        deltas = [f["chunk"] for f in frames if f["type"] == "delta" and f["id"] == cid]
        assert {d["object"] for d in deltas} == {"chat.completion.chunk"}
        assert len({d["id"] for d in deltas}) == 1
        # No usage-only chunk unless the request asked for it (as over HTTP).
        assert all(d["choices"] for d in deltas)


async def test_outside_client_sees_failover_before_first_token(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """With the `websockets` library as client: the first provider fails before its first
    token, the answer comes from the second, and done says failover after two attempts."""
    alpha, _, gw = await two(sim, gateway, retries=0)
    await alpha.script(steps=[{"status": 503}])
    async with websockets.connect(ws_url(gw)) as ws:
        await ws.send(json.dumps(chat("x", stream_options={"include_usage": True})))
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
    assert frames[0] == {"type": "ack", "id": "x", "session": frames[0]["session"]}
    assert text_of(frames, "x") == reply_text("beta")
    done = frames[-1]
    assert (done["type"], done["provider"], done["attempts"], done["fallback"]) == (
        "done", "beta", 2, "failover")
    # Asked for: the usage-only chunk is forwarded as a delta too.
    assert frames[-2]["chunk"]["choices"] == [] and frames[-2]["chunk"]["usage"]
    assert (await alpha.stats())["chat"] == 1


async def test_cancel_stops_the_upstream_stream(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession) -> None:
    """cancel ends the request with a request_cancelled error frame and closes the upstream
    connection mid-answer (the simulator sees its client go), with no done frame."""
    alpha, _, gw = await two(sim, gateway)
    await alpha.script(then={"chunks": 400, "chunk_delay_ms": 20})
    sim_server = alpha.server.runner.server  # type: ignore[union-attr]
    assert sim_server is not None
    async with session.ws_connect(ws_url(gw)) as ws:
        await ws.send_json(chat("c"))
        while True:
            frame = json.loads((await asyncio.wait_for(ws.receive(), 20)).data)
            if frame["type"] == "delta" and text_of([frame], "c"):
                break
        assert len(sim_server.connections) == 1  # the answer is streaming
        await ws.send_json({"type": "cancel", "id": "c"})
        frames = await frames_until(ws, {"c"})
        end = frames[-1]
        assert end["type"] == "error" and end["error"]["code"] == "request_cancelled"
        assert not [f for f in frames if f["type"] == "done"]
        await eventually(lambda: not sim_server.connections)
        # The socket stays usable; a cancel of an id not in flight is an error frame.
        await ws.send_json({"type": "cancel", "id": "c"})
        frame = json.loads((await asyncio.wait_for(ws.receive(), 20)).data)
        assert (frame["id"], frame["error"]["code"]) == ("c", "unknown_id")
    assert len(text_of(frames, "c")) < len(reply_text("alpha", 400))


async def test_bad_frames_are_error_frames_and_the_socket_stays_open(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession) -> None:
    """Non-JSON, a missing or unknown type, a binary frame, a bad chat body (param named),
    an unknown model, a duplicate id in flight, more than the in-flight bound: each is one
    error frame, and the socket then still answers a good chat."""
    alpha, _, gw = await two(sim, gateway,
                             settings=Settings(http_backoff_base_ms=0, ws_max_in_flight=2))
    await alpha.script(steps=[{"chunks": 30, "chunk_delay_ms": 10}] * 2)
    async with session.ws_connect(ws_url(gw)) as ws:
        async def error_for(data: str | bytes) -> dict[str, Any]:
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_str(data)
            frame: dict[str, Any] = json.loads((await asyncio.wait_for(ws.receive(), 20)).data)
            assert frame["type"] == "error", frame
            return frame

        bad = await error_for("{not json")
        assert bad["error"]["code"] == "invalid_json" and "id" not in bad
        bad = await error_for('{"type": "shout", "id": "q"}')
        assert (bad["error"]["code"], bad["error"]["param"]) == ("unknown_frame_type", "type")
        assert "shout" in bad["error"]["message"]
        bad = await error_for('{"id": "q"}')
        assert bad["error"]["code"] == "unknown_frame_type"
        bad = await error_for(b"\x00\x01")
        assert bad["error"]["code"] == "invalid_frame"
        bad = await error_for('{"type": "subscribe", "topics": ["weather"]}')
        assert (bad["error"]["code"], bad["error"]["param"]) == ("invalid_frame", "topics[0]")
        bad = await error_for(json.dumps(chat("t", temperature=5)))
        assert bad["id"] == "t"
        assert (bad["error"]["type"], bad["error"]["code"], bad["error"]["param"]) == (
            "invalid_request_error", "invalid_request", "temperature")
        bad = await error_for(json.dumps(chat("u", tempurature=1)))
        assert bad["error"]["param"] == "tempurature"
        bad = await error_for(json.dumps(
            {"type": "chat", "id": "m", "request": {"model": "nope", "messages": MSG}}))
        assert (bad["error"]["code"], bad["error"]["param"]) == ("model_not_found", "model")

        await ws.send_json(chat("d1"))
        await ws.send_json(chat("d1"))
        await ws.send_json(chat("d2"))
        await ws.send_json(chat("d3"))
        frames = await frames_until(ws, {"d1", "d2"})
        errors = [f for f in frames if f["type"] == "error"]
        assert [(e["id"], e["error"]["code"]) for e in errors] == [
            ("d1", "duplicate_id"), ("d3", "too_many_in_flight")]
        assert errors[1]["error"]["type"] == "rate_limit_error"
        assert text_of(frames, "d1") == reply_text("alpha", 30)

        await ws.send_json(chat("ok", max_tokens=3))
        frames = await frames_until(ws, {"ok"})
        assert text_of(frames, "ok") == reply_text("alpha", 3)


async def test_frame_over_the_limit_closes_1009(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession) -> None:
    """A frame larger than the socket's limit closes it with 1009 (message too big)."""
    _, _, gw = await two(sim, gateway,
                         settings=Settings(http_backoff_base_ms=0, ws_max_frame_bytes=4096))
    async with session.ws_connect(ws_url(gw)) as ws:
        await ws.send_json(chat("big", user="x" * 5000))
        msg = await asyncio.wait_for(ws.receive(), 20)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1009


async def test_invalid_session_and_plain_get_are_400(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession) -> None:
    """A malformed session token, or a GET without the upgrade, is an OpenAI-shaped 400."""
    _, _, gw = await two(sim, gateway)
    async with session.get(ws_url(gw, "?session=short").replace("ws", "http", 1)) as resp:
        assert resp.status == 400
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(ws_url(gw, "?session=short"))
    assert info.value.status == 400
    async with session.get(f"{gw.base_url}/ws") as resp:
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (400, "websocket_expected")


async def test_resume_on_the_same_process(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession) -> None:
    """A client that leaves mid-answer and comes back with its session gets the answer
    that finished meanwhile whole (one delta with the whole message, then done), the one
    still running when it finishes, and an error for an id it never sent; re-sending a
    running id is refused rather than asked of the provider twice."""
    alpha, _, gw = await two(sim, gateway)
    await alpha.script(steps=[{"chunks": 10, "chunk_delay_ms": 20},
                              {"chunks": 40, "chunk_delay_ms": 25}])
    url = ws_url(gw, "?session=test-session-0123456789")
    async with session.ws_connect(url) as ws:
        await ws.send_json(chat("fast"))
        await ws.send_json(chat("slow"))
        for _ in range(2):
            assert json.loads((await ws.receive()).data)["type"] == "ack"
    store = gw.app[WS].store
    await eventually(lambda: store.running() == 1)  # "fast" finished while we were away
    async with session.ws_connect(url) as ws:
        # Sending "slow" again instead of resuming it would ask the provider twice: refused.
        await ws.send_json(chat("slow"))
        refused = json.loads((await ws.receive()).data)
        assert (refused["type"], refused["id"], refused["error"]["code"]) == (
            "error", "slow", "duplicate_id")
        await ws.send_json({"type": "resume", "ids": ["fast", "slow", "never"]})
        frames = await frames_until(ws, {"fast", "slow", "never"})
    for cid, n in (("fast", 10), ("slow", 40)):
        deltas = [f for f in frames if f["type"] == "delta" and f["id"] == cid]
        assert len(deltas) == 1
        choice = deltas[0]["chunk"]["choices"][0]
        assert choice["delta"]["content"] == reply_text("alpha", n)
        assert choice["finish_reason"] == "stop"
        assert only(frames, "done", cid)["provider"] == "alpha"
    assert only(frames, "error", "never")["error"]["code"] == "unknown_id"
    assert (await alpha.stats())["chat"] == 2


async def test_subscribe_pushes_breaker_and_degradation_changes(
        sim: SimFactory, gateway: GatewayFactory, session: aiohttp.ClientSession,
        pg_clean: str) -> None:
    """subscribe sends the current state, then every provider row and degradation fleet
    write as the bus delivers it."""
    _, _, gw = await two(sim, gateway, settings=Settings(http_backoff_base_ms=0,
                                                         database_url=pg_clean))
    async with Bus(pg_clean, View(), name="test") as bus, session.ws_connect(ws_url(gw)) as ws:
        await ws.send_json({"type": "subscribe", "topics": ["providers", "degradation"]})

        async def next_event(topic: str) -> dict[str, Any]:
            while True:
                frame: dict[str, Any] = json.loads(
                    (await asyncio.wait_for(ws.receive(), 20)).data)
                assert frame["type"] == "event"
                if frame["topic"] == topic:
                    return frame

        first = await next_event("degradation")
        assert first["data"] is None and first["key"] in ("degradation/auto",
                                                          "degradation/operator")
        assert await bus.publish("alpha", breaker="open", reason="test trip", source="test",
                                 open_for=30)
        event = await next_event("providers")
        while event["data"]["provider"] != "alpha" or event["data"]["breaker"] != "open":
            event = await next_event("providers")
        assert event["data"]["reason"] == "test trip"
        level = {"level": "severe", "reason": "drill", "since": 1.0, "expires_at": None,
                 "by": "test"}
        await bus.put_fleet("degradation/operator", level, source="test")
        event = await next_event("degradation")
        while event["key"] != "degradation/operator" or event["data"] is None:
            event = await next_event("degradation")
        assert event["data"] == level


async def test_slow_reader_is_closed_1008_without_growing_memory(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """A client that stops reading while a long answer streams is closed with 1008 once
    its queued output passes the bound; it finds the close frame when it reads again."""
    alpha, _, gw = await two(sim, gateway, settings=Settings(
        http_backoff_base_ms=0, ws_max_queued_bytes=256 * 1024))
    await alpha.script(then={"chunks": 40_000})
    hub = gw.app[WS]
    loop = asyncio.get_running_loop()
    proto = ClientProtocol(parse_uri(ws_url(gw)), max_size=None)
    sock = socket.socket()
    # A tiny receive window: the server's kernel buffer, not ours, holds what we do not read.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (gw.server.host, gw.server.port))
    try:
        proto.send_request(proto.connect())
        await loop.sock_sendall(sock, b"".join(proto.data_to_send()))
        while proto.handshake_exc is None and proto.state.name == "CONNECTING":
            proto.receive_data(await loop.sock_recv(sock, 4096))
        assert proto.state.name == "OPEN"
        proto.send_text(json.dumps(chat("long")).encode())
        await loop.sock_sendall(sock, b"".join(proto.data_to_send()))
        await eventually(lambda: hub.slow_closed == 1, within=60)
        close: Frame | None = None
        while close is None:
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 20)
            proto.receive_data(data)
            for ev in proto.events_received():
                if isinstance(ev, Frame) and ev.opcode is Opcode.CLOSE:
                    close = ev
            if not data:
                break
        assert close is not None
        assert int.from_bytes(close.data[:2], "big") == 1008
    finally:
        sock.close()
    assert hub.slow_closed == 1
