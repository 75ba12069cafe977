"""The provider simulator, seen from a plain aiohttp client over real sockets."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from bulwark.sim import DEFAULT_CHUNKS, SIM_STATE, create_fleet_app, create_sim_app, reply_text
from tests.procs import free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


@pytest.fixture
async def sim(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(create_sim_app("alpha", seed=7))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def url(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


async def chat(session: aiohttp.ClientSession, server: TestServer, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with session.post(url(server, "/v1/chat/completions"), json=body,
                            headers=headers) as resp:
        return resp.status, await resp.read(), resp


def events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, checking its framing on the way."""
    text = raw.decode()
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert "\n" not in block, block
        assert block.startswith("data: "), block
        out.append(block[6:])
    return out


async def test_completion_is_openai_shaped(sim: TestServer,
                                           session: aiohttp.ClientSession) -> None:
    """A non-streamed answer has OpenAI's fields, echoes the model and names the sim."""
    status, raw, resp = await chat(session, sim, CHAT)
    assert status == 200
    assert resp.content_type == "application/json"
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply_text("alpha")
    assert choice["message"]["content"].startswith("Hello from sim alpha")
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == DEFAULT_CHUNKS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream_is_exactly_openai_sse(sim: TestServer,
                                            session: aiohttp.ClientSession) -> None:
    """A stream: role chunk, one chunk per word, finish chunk, [DONE]; no usage unasked."""
    status, raw, resp = await chat(session, sim, STREAM)
    assert status == 200
    assert resp.content_type == "text/event-stream"
    data = events(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 1 + DEFAULT_CHUNKS + 1
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "gpt-4o-mini", "chat.completion.chunk")}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(words) == reply_text("alpha")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


async def test_stream_usage_chunk_only_when_asked(sim: TestServer,
                                                  session: aiohttp.ClientSession) -> None:
    """include_usage adds one `choices: []` chunk with usage just before [DONE]."""
    body = {**STREAM, "stream_options": {"include_usage": True}}
    _, raw, _ = await chat(session, sim, body)
    data = events(raw)
    assert data[-1] == "[DONE]"
    usage_chunk = json.loads(data[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == DEFAULT_CHUNKS
    assert json.loads(data[-3])["choices"][0]["finish_reason"] == "stop"
    assert sum("usage" in json.loads(d) for d in data[:-1]) == 1


async def test_chunks_and_max_tokens_cap_the_answer(sim: TestServer,
                                                    session: aiohttp.ClientSession) -> None:
    """x-sim-chunks sets the number of content chunks; max_tokens caps it."""
    _, raw, _ = await chat(session, sim, STREAM, {"x-sim-chunks": "5"})
    assert len(events(raw)) == 1 + 5 + 1 + 1
    _, raw, _ = await chat(session, sim, {**STREAM, "max_tokens": 2})
    assert len(events(raw)) == 1 + 2 + 1 + 1
    _, raw, _ = await chat(session, sim, {**CHAT, "max_completion_tokens": 3})
    assert json.loads(raw)["choices"][0]["message"]["content"] == reply_text("alpha", 3)


async def test_chunk_delay_keeps_the_stream_whole(sim: TestServer,
                                                  session: aiohttp.ClientSession) -> None:
    """A paced stream (written chunk by chunk) carries the same events as a fast one."""
    headers = {"x-sim-chunks": "4", "x-sim-chunk-delay-ms": "1", "x-sim-first-token-ms": "1"}
    _, raw, _ = await chat(session, sim, STREAM, headers)
    data = events(raw)
    assert data[-1] == "[DONE]"
    words = [json.loads(d)["choices"][0]["delta"]["content"] for d in data[1:-2]]
    assert "".join(words) == reply_text("alpha", 4)


async def test_models_and_health(sim: TestServer, session: aiohttp.ClientSession) -> None:
    """GET /v1/models lists sim-1; GET /health answers ok with the sim's name."""
    async with session.get(url(sim, "/v1/models")) as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert "sim-1" in [m["id"] for m in models["data"]]
    async with session.get(url(sim, "/health")) as resp:
        assert await resp.json() == {"status": "ok", "name": "alpha"}


async def test_530_is_cloudflare_html(sim: TestServer, session: aiohttp.ClientSession) -> None:
    """x-sim-status: 530 answers an HTML page saying "error code: 530", not JSON."""
    status, raw, resp = await chat(session, sim, CHAT, {"x-sim-status": "530"})
    assert status == 530
    assert resp.content_type == "text/html"
    assert b"<html>" in raw
    assert b"error code: 530" in raw


async def test_429_sends_retry_after(sim: TestServer, session: aiohttp.ClientSession) -> None:
    """429 carries Retry-After: 1 by default, or x-sim-retry-after's value."""
    status, raw, resp = await chat(session, sim, CHAT, {"x-sim-status": "429"})
    assert status == 429
    assert resp.headers["Retry-After"] == "1"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    _, _, resp = await chat(session, sim, STREAM,
                            {"x-sim-status": "429", "x-sim-retry-after": "7"})
    assert resp.headers["Retry-After"] == "7"


@pytest.mark.parametrize(("status", "etype"), [(400, "invalid_request_error"),
                                               (401, "invalid_request_error"),
                                               (418, "invalid_request_error"),
                                               (503, "server_error")])
async def test_other_errors_are_openai_json(sim: TestServer, session: aiohttp.ClientSession,
                                            status: int, etype: str) -> None:
    """Other 4xx/5xx answer OpenAI's error shape; 401 carries a key hint to be hidden."""
    got, raw, resp = await chat(session, sim, CHAT, {"x-sim-status": str(status)})
    assert got == status
    assert resp.content_type == "application/json"
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == etype
    if status == 401:
        assert "sk-ab***cd" in error["message"]
    assert "Retry-After" not in resp.headers


@pytest.mark.parametrize("body", [CHAT, STREAM])
async def test_reset_drops_the_connection(sim: TestServer, session: aiohttp.ClientSession,
                                          body: dict[str, Any]) -> None:
    """x-sim-fault: reset closes the socket without any response."""
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await chat(session, sim, body, {"x-sim-fault": "reset"})


async def test_malformed_completion_is_not_json(sim: TestServer,
                                                session: aiohttp.ClientSession) -> None:
    """A malformed answer is a 200 whose JSON body does not parse."""
    status, raw, _ = await chat(session, sim, CHAT, {"x-sim-fault": "malformed"})
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


async def test_malformed_stream_has_a_broken_event(sim: TestServer,
                                                   session: aiohttp.ClientSession) -> None:
    """A malformed stream carries one `data: {not json` event among valid ones."""
    _, raw, _ = await chat(session, sim, STREAM, {"x-sim-fault": "malformed"})
    data = events(raw)
    assert "{not json" in data
    assert data[-1] == "[DONE]"


async def test_truncated_completion_fails_the_payload(sim: TestServer,
                                                      session: aiohttp.ClientSession) -> None:
    """A truncated answer promises more bytes than it sends, then closes."""
    with pytest.raises(aiohttp.ClientPayloadError):
        await chat(session, sim, CHAT, {"x-sim-fault": "truncate"})


async def test_truncated_stream_ends_cleanly_but_incomplete(
        sim: TestServer, session: aiohttp.ClientSession) -> None:
    """A truncated stream ends without error, finish_reason or [DONE]: the silent loss."""
    status, raw, _ = await chat(session, sim, STREAM, {"x-sim-fault": "truncate"})
    assert status == 200
    data = events(raw)
    assert "[DONE]" not in data
    chunks = [json.loads(d) for d in data]
    assert len(chunks) == 1 + DEFAULT_CHUNKS // 2
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


async def test_stream_stall_times_out_the_reader(sim: TestServer,
                                                 session: aiohttp.ClientSession) -> None:
    """A stall sends some chunks, then nothing: only the client's read timeout ends it."""
    seen: list[bytes] = []

    async def read_all(resp: aiohttp.ClientResponse) -> None:
        async for line in resp.content:
            if line.startswith(b"data: "):
                seen.append(line)

    async with session.post(url(sim, "/v1/chat/completions"), json=STREAM,
                            headers={"x-sim-fault": "stall"},
                            timeout=aiohttp.ClientTimeout(sock_read=0.2)) as resp:
        assert resp.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await read_all(resp)
    assert len(seen) == 1 + DEFAULT_CHUNKS // 2
    assert not any(b"[DONE]" in line or b'"stop"' in line for line in seen)


async def test_stall_before_sends_headers_only(sim: TestServer,
                                               session: aiohttp.ClientSession) -> None:
    """stall-before answers the status line and headers, then no event at all."""
    async with session.post(url(sim, "/v1/chat/completions"), json=STREAM,
                            headers={"x-sim-fault": "stall-before"},
                            timeout=aiohttp.ClientTimeout(sock_read=0.2)) as resp:
        assert resp.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await resp.content.readline()


async def test_stall_gives_up_without_a_clean_end(aiohttp_server: AiohttpServer,
                                                  session: aiohttp.ClientSession) -> None:
    """A stall that outlasts stall_sec ends by dropping the connection, never cleanly."""
    server = await aiohttp_server(create_sim_app("alpha", stall_sec=0.2))
    async with session.post(url(server, "/v1/chat/completions"), json=STREAM,
                            headers={"x-sim-fault": "stall"}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_first_token_delay_holds_content_back(sim: TestServer,
                                                    session: aiohttp.ClientSession) -> None:
    """first-token-ms sends headers and the role chunk, then waits before any content."""
    async with session.post(url(sim, "/v1/chat/completions"), json=STREAM,
                            headers={"x-sim-first-token-ms": "30000"},
                            timeout=aiohttp.ClientTimeout(sock_read=0.2)) as resp:
        assert resp.status == 200
        first = await resp.content.readline()
        assert b'"role":"assistant"' in first
        assert await resp.content.readline() == b"\n"
        with pytest.raises(asyncio.TimeoutError):
            await resp.content.readline()


async def test_latency_delays_the_status_line(sim: TestServer,
                                              session: aiohttp.ClientSession) -> None:
    """latency-ms holds back even the headers."""
    with pytest.raises(asyncio.TimeoutError):
        await session.post(url(sim, "/v1/chat/completions"), json=CHAT,
                           headers={"x-sim-latency-ms": "30000"},
                           timeout=aiohttp.ClientTimeout(total=0.2))


async def test_error_event_ends_the_stream(sim: TestServer,
                                           session: aiohttp.ClientSession) -> None:
    """error-event sends some chunks, then a final `data: {"error": ...}` and no [DONE]."""
    _, raw, _ = await chat(session, sim, STREAM, {"x-sim-fault": "error-event"})
    data = events(raw)
    assert "[DONE]" not in data
    last = json.loads(data[-1])
    assert last["error"]["type"] == "server_error"
    assert len(data) == 1 + DEFAULT_CHUNKS // 2 + 1


async def post_script(session: aiohttp.ClientSession, server: TestServer,
                      script: dict[str, Any]) -> None:
    async with session.post(url(server, "/_sim/script"), json=script) as resp:
        assert resp.status == 200, await resp.text()


async def test_script_steps_then_then(sim: TestServer, session: aiohttp.ClientSession) -> None:
    """Chat requests consume the steps in order; `then` applies once they run out."""
    await post_script(session, sim, {"steps": [{"status": 503}, {"status": 429}, {}],
                                     "then": {"status": 530}})
    statuses = [(await chat(session, sim, CHAT))[0] for _ in range(5)]
    assert statuses == [503, 429, 200, 530, 530]


async def test_script_fault_step_and_header_override(sim: TestServer,
                                                     session: aiohttp.ClientSession) -> None:
    """A step can reset; a per-request header overrides the step it consumes."""
    await post_script(session, sim, {"steps": [{"fault": "reset"}, {"status": 503}]})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await chat(session, sim, CHAT)
    status, _, _ = await chat(session, sim, CHAT, {"x-sim-status": "200"})
    assert status == 200
    assert (await chat(session, sim, CHAT))[0] == 200


async def test_probes_follow_the_script_only_when_included(
        sim: TestServer, session: aiohttp.ClientSession) -> None:
    """GET /v1/models ignores the script unless include_probes; models_status always wins."""
    async def models_status() -> int:
        async with session.get(url(sim, "/v1/models")) as resp:
            return resp.status

    await post_script(session, sim, {"steps": [], "then": {"status": 503}})
    assert await models_status() == 200
    await post_script(session, sim, {"steps": [], "then": {"status": 503},
                                     "include_probes": True})
    assert await models_status() == 503
    assert (await chat(session, sim, CHAT))[0] == 503
    await post_script(session, sim, {"models_status": 502})
    assert await models_status() == 502
    assert (await chat(session, sim, CHAT))[0] == 200


async def test_log_records_requests(sim: TestServer, session: aiohttp.ClientSession) -> None:
    """The log has method, path, headers without the key, parsed body, fault and time."""
    await post_script(session, sim, {"steps": [{"status": 503}]})
    await chat(session, sim, CHAT, {"Authorization": "Bearer sk-secret-value",
                                    "X-Request-Id": "r1"})
    await chat(session, sim, STREAM, {"x-sim-chunks": "2"})
    async with session.get(url(sim, "/v1/models")) as resp:
        await resp.read()
    async with session.get(url(sim, "/_sim/log")) as resp:
        log = await resp.json()
    assert [(e["method"], e["path"]) for e in log] == [
        ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models")]
    first, second, third = log
    assert first["authorization_present"] is True
    assert "authorization" not in first["headers"]
    assert "sk-secret-value" not in json.dumps(log)
    assert first["headers"]["x-request-id"] == "r1"
    assert first["body"] == CHAT
    assert first["fault"] == {"status": 503}
    assert first["step"] == 0
    assert second["authorization_present"] is False
    assert second["fault"] == {"chunks": 2}
    assert second["step"] is None
    assert third["body"] is None
    # Monotonic, not wall-clock, time: the epoch of time.time() is far ahead of it.
    assert first["t"] <= second["t"] <= third["t"] <= time.monotonic()


async def test_stats_count_and_reset_clears(sim: TestServer,
                                            session: aiohttp.ClientSession) -> None:
    """/_sim/stats counts upstream attempts; /_sim/reset clears script, log and counts."""
    await post_script(session, sim, {"steps": [], "then": {"status": 503}})
    await chat(session, sim, CHAT)
    async with session.get(url(sim, "/v1/models")) as resp:
        await resp.read()
    async with session.get(url(sim, "/_sim/stats")) as resp:
        assert await resp.json() == {"chat": 1, "models": 1}
    async with session.post(url(sim, "/_sim/reset")) as resp:
        assert resp.status == 200
    async with session.get(url(sim, "/_sim/stats")) as resp:
        assert await resp.json() == {"chat": 0, "models": 0}
    async with session.get(url(sim, "/_sim/log")) as resp:
        assert await resp.json() == []
    assert (await chat(session, sim, CHAT))[0] == 200


async def test_bad_controls_are_refused(sim: TestServer, session: aiohttp.ClientSession) -> None:
    """An unknown fault, a bad status or an unknown script key is a loud 400, not ignored."""
    for headers in ({"x-sim-fault": "explode"}, {"x-sim-status": "abc"},
                    {"x-sim-status": "999"}):
        status, raw, _ = await chat(session, sim, CHAT, headers)
        assert status == 400
        assert json.loads(raw)["error"]["type"] == "sim_error"
    async with session.post(url(sim, "/_sim/script"), json={"stepz": []}) as resp:
        assert resp.status == 400
    async with session.post(url(sim, "/_sim/script"),
                            json={"steps": [{"fault": "explode"}]}) as resp:
        assert resp.status == 400


async def test_seed_makes_ids_repeatable(aiohttp_server: AiohttpServer,
                                         session: aiohttp.ClientSession) -> None:
    """Two simulators with one seed hand out the same ids; the state is scriptable in-process."""
    ids = []
    for _ in range(2):
        server = await aiohttp_server(create_sim_app("beta", seed=42))
        assert server.app is not None
        assert server.app[SIM_STATE].name == "beta"
        _, raw, _ = await chat(session, server, CHAT)
        ids.append(json.loads(raw)["id"])
    assert ids[0] == ids[1]



async def test_main_serves_as_a_process(session: aiohttp.ClientSession) -> None:
    """`python -m bulwark.sim --port P --name N` serves chat on P as N."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bulwark.sim", "--port", str(port),
                             "--name", "gamma"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                async with session.get(f"{base}/health") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectorError:
                # A real process takes a moment to bind: poll its port.
                await asyncio.sleep(0.05)
        async with session.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            body = await resp.json()
        assert body["choices"][0]["message"]["content"].startswith("Hello from sim gamma")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


async def test_fleet_serves_each_name_under_its_prefix(aiohttp_server: AiohttpServer,
                                                       session: aiohttp.ClientSession) -> None:
    """A fleet app answers as `sim` at / and as each name under /<name>; `/_sim/fail`
    (with `?status=`) fails only that one, probes included, until `/_sim/reset`; a status
    that is not an error is refused."""
    server = await aiohttp_server(create_fleet_app(["alpha", "beta"]))
    for prefix, name in (("", "sim"), ("/alpha", "alpha"), ("/beta", "beta")):
        async with session.post(url(server, f"{prefix}/v1/chat/completions"), json=CHAT) as r:
            assert (await r.json())["choices"][0]["message"]["content"] == reply_text(name)
    async with session.post(url(server, "/beta/_sim/fail?status=503")) as resp:
        assert await resp.json() == {"ok": True, "name": "beta", "status": 503}
    async with session.post(url(server, "/beta/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 503
    async with session.get(url(server, "/beta/v1/models")) as resp:
        assert resp.status == 503
    async with session.post(url(server, "/alpha/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 200
    async with session.post(url(server, "/alpha/_sim/fail?status=200")) as resp:
        assert resp.status == 400
    async with session.post(url(server, "/beta/_sim/reset")) as resp:
        assert resp.status == 200
    async with session.post(url(server, "/beta/v1/chat/completions"), json=CHAT) as resp:
        assert resp.status == 200


async def test_fail_header_fails_only_the_named_simulators(
        sim: TestServer, session: aiohttp.ClientSession) -> None:
    """`x-sim-fail` lists simulator names: the one named answers 530, another ignores it."""
    status, _, _ = await chat(session, sim, CHAT, {"x-sim-fail": "beta, alpha"})
    assert status == 530
    status, _, _ = await chat(session, sim, CHAT, {"x-sim-fail": "beta"})
    assert status == 200
