"""WebSocket chat across real web processes: resume on another process after kill -9 of
the first, and SIGTERM closing sockets with 1012 after their answers."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import websockets

from bulwark.sim import reply_text
from tests.conftest import SimFactory
from tests.procs import Spawn, free_port, until, write_providers
from tests.test_cluster import start_web

pytestmark = pytest.mark.slow

MSG: Any = [{"role": "user", "content": "Hi"}]
SESSION = "cluster-session-0123456789"


def chat(cid: str, max_tokens: int) -> str:
    return json.dumps({"type": "chat", "id": cid, "request": {
        "model": "default", "messages": MSG, "max_tokens": max_tokens}})


async def read_until(ws: aiohttp.ClientWebSocketResponse, ids: set[str]) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    left = set(ids)
    while left:
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        frame: dict[str, Any] = json.loads(msg.data)
        frames.append(frame)
        if frame["type"] in ("done", "error") and frame.get("id") in left:
            left.discard(frame["id"])
    return frames


def whole(frames: list[dict[str, Any]], cid: str) -> str:
    deltas = [f for f in frames if f["type"] == "delta" and f["id"] == cid]
    assert len(deltas) == 1, frames
    content: str = deltas[0]["chunk"]["choices"][0]["delta"]["content"]
    return content


def outcome(frames: list[dict[str, Any]], cid: str) -> dict[str, Any]:
    ends = [f for f in frames if f["type"] in ("done", "error") and f.get("id") == cid]
    assert len(ends) == 1, frames
    return ends[0]


async def test_resume_on_another_process_after_kill_9(
        sim: SimFactory, spawn: Spawn, pg_clean: str, db: asyncpg.Connection,
        tmp_path: Path) -> None:
    """Three chats on web A, then the client leaves. On web B, `resume` delivers one still
    running on A when A finishes it; after kill -9 of A, B delivers the two A finished,
    whole, reports the one A was running as lost, and an unknown id as unknown — and the
    upstream was asked once per request, never again."""
    alpha = await sim("alpha")
    await alpha.script(then={"chunks": 200, "chunk_delay_ms": 50})
    providers = write_providers(tmp_path / "p.toml", [alpha])
    a = await start_web(spawn, pg_clean, providers, free_port())
    b = await start_web(spawn, pg_clean, providers, free_port())
    query = f"/v1/ws?session={SESSION}"
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(a.base + query) as ws:
            await ws.send_str(chat("quick", 2))
            await ws.send_str(chat("middle", 30))
            await ws.send_str(chat("endless", 200))
            acks = [json.loads((await ws.receive()).data) for _ in range(3)]
            assert {f["type"] for f in acks} == {"ack"}
        # The client is gone; A goes on answering and keeps the answers.
        await until(lambda: db.fetchval("select count(*) = 3 from ws_answers"),
                    what="running rows written")
        async with s.ws_connect(b.base + query) as ws:
            await ws.send_str(json.dumps({"type": "resume", "ids": ["middle"]}))
            frames = await read_until(ws, {"middle"})  # finishes on A, delivered by B
        assert whole(frames, "middle") == reply_text("alpha", 30)
        assert outcome(frames, "middle")["type"] == "done"

        a.daemon.proc.kill()
        await a.daemon.proc.wait()
        async with s.ws_connect(b.base + query) as ws:
            await ws.send_str(json.dumps(
                {"type": "resume", "ids": ["quick", "middle", "endless", "never"]}))
            frames = await read_until(ws, {"quick", "middle", "endless", "never"})
    assert whole(frames, "quick") == reply_text("alpha", 2)
    assert whole(frames, "middle") == reply_text("alpha", 30)
    done = outcome(frames, "quick")
    assert (done["type"], done["provider"], done["attempts"], done["fallback"]) == (
        "done", "alpha", 1, "none")
    assert done["usage"]["completion_tokens"] == 2
    assert outcome(frames, "endless")["error"]["code"] == "answer_lost"
    assert outcome(frames, "never")["error"]["code"] == "unknown_id"
    assert (await alpha.stats())["chat"] == 3


async def test_sigterm_closes_sockets_1012_after_their_answers(
        sim: SimFactory, spawn: Spawn, tmp_path: Path) -> None:
    """SIGTERM with two answers in flight on a socket (the `websockets` library as client):
    the short one completes, the one longer than the drain ends with a gateway_shutdown
    error frame, then the socket is closed with 1012 and the process exits cleanly."""
    alpha = await sim("alpha")
    await alpha.script(then={"chunks": 200, "chunk_delay_ms": 50})
    providers = write_providers(tmp_path / "p.toml", [alpha])
    web = await start_web(spawn, None, providers, free_port(), BULWARK_DRAIN_SEC="3")
    url = web.base.replace("http", "ws", 1) + "/v1/ws"
    frames: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        await ws.send(chat("short", 20))
        await ws.send(chat("long", 200))
        while len([f for f in frames if f["type"] == "delta"]) < 4:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        web.daemon.proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert outcome(frames, "short")["type"] == "done"
    text = "".join(c["delta"].get("content") or "" for f in frames
                   if f["type"] == "delta" and f["id"] == "short" for c in f["chunk"]["choices"])
    assert text == reply_text("alpha", 20)
    assert outcome(frames, "long")["error"]["code"] == "gateway_shutdown"
    assert await asyncio.wait_for(web.daemon.proc.wait(), 20) == 0
