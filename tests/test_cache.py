"""The response cache's parts: the key, the bounds, the Postgres store and its retention, and
a stream kept as one answer and played back."""

from __future__ import annotations

import socket
from typing import Any

import asyncpg
import msgspec

from bulwark.cache import RS, ResponseCache, cache_key, parse_cache_control, prune
from bulwark.replay import assemble, canned, events_of, stored_completion
from bulwark.wire import ChatRequest, Chunk, any_decoder, chunk_decoder, completion_decoder

BASE: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}


def req(**fields: Any) -> ChatRequest:
    return msgspec.convert({**BASE, **fields}, ChatRequest)


def test_key_covers_what_changes_the_answer_and_nothing_else() -> None:
    """Same key for a streamed, labelled or reordered twin; another key for any parameter
    that changes the answer, another model, or another scope."""
    base = cache_key(req(temperature=0.5, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"a": 1, "b": 2}}}]))
    twin = cache_key(req(stream=True, stream_options={"include_usage": True}, user="u1",
                         metadata={"k": "v"}, temperature=0.5, tools=[{"function": {
                             "parameters": {"b": 2, "a": 1}, "name": "f"},
                             "type": "function"}]))
    assert base == twin
    others = [req(temperature=0.6), req(model="other"), req(top_p=0.5), req(max_tokens=5),
              req(stop=["x"]), req(seed=1), req(n=2), req(response_format={"type": "json_object"}),
              req(messages=[{"role": "user", "content": "hi!"}]), req(tool_choice="none"),
              req(presence_penalty=1), req(logit_bias={"1": 1.0}), req(logprobs=True)]
    keys = {cache_key(r) for r in others} | {base}
    assert len(keys) == len(others) + 1
    assert cache_key(req()) != cache_key(req(), scope="key_1")
    assert cache_key(req(temperature=1)) == cache_key(req(temperature=1.0))


def test_cache_control_directives() -> None:
    """no-store and no-cache are read from a list, case-insensitively; others are ignored."""
    assert parse_cache_control("max-age=0, No-Store") == (True, False)
    assert parse_cache_control("no-cache") == (False, True)
    assert parse_cache_control(None) == (False, False)


def test_memory_and_entry_bounds() -> None:
    """An answer over the entry bound is not kept; the LRU evicts the least recent past its
    byte budget; an answer older than the asked age is not a hit."""
    now = [0.0]
    cache = ResponseCache(None, max_entry_bytes=1024, memory_bytes=2048, clock=lambda: now[0])
    cache.remember("big", "m", b"x" * 1025)
    assert cache.too_large == 1 and cache.recent("big", 60) is None
    for key in ("a", "b"):
        cache.remember(key, "m", b"y" * 1000)
    assert cache.recent("a", 60) is not None  # now the most recent
    cache.remember("c", "m", b"z" * 1000)
    assert cache.recent("b", 60) is None and cache.recent("a", 60) is not None
    assert cache.memory_used <= 2048
    now[0] = 61.0
    assert cache.recent("a", 60) is None


async def test_postgres_store_lookup_and_prune(pg_clean: str) -> None:
    """Answers written in one batch are found by a second process's cache with their age;
    retention deletes rows by age, then the oldest beyond the total size."""
    writer = ResponseCache(pg_clean)
    reader = ResponseCache(pg_clean)
    try:
        for i in range(3):
            writer.remember(f"k{i}", "default", b'{"n":%d}' % i)
        writer.remember("k0", "default", b'{"n":0}')  # rewritten within REWRITE_SEC: one row
        await writer.flush()
        assert writer.rows_written == 3
        hit = await reader.lookup("k1", 60)
        assert hit is not None and hit.body == b'{"n":1}' and hit.age >= 0
        again = await reader.lookup("k1", 60)  # now from its own memory
        assert again is not None and again.body == hit.body
        assert (reader.hits_db, reader.hits_memory) == (1, 1)
        assert await reader.lookup("missing", 60) is None and reader.misses == 1
    finally:
        await writer.close()
        await reader.close()
    conn = await asyncpg.connect(pg_clean)
    try:
        await conn.execute("update response_cache set created_at = now() - interval '2 days'"
                           " where key = 'k2'")
        await conn.execute("update response_cache set created_at = now() - interval '1 hour'"
                           " where key = 'k0'")
        assert await prune(conn, max_age_sec=86_400, max_bytes=1 << 20) == 1
        # Both remaining rows are 7 bytes: a 10-byte budget keeps only the newest (k1).
        assert await prune(conn, max_age_sec=86_400, max_bytes=10) == 1
        assert [r["key"] for r in await conn.fetch("select key from response_cache")] == ["k1"]
    finally:
        await conn.close()


async def test_unreachable_database_is_a_miss() -> None:
    """A lookup against a database that does not answer is a counted miss, not an error;
    a failed write batch is counted and dropped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = ResponseCache(f"postgresql://u@127.0.0.1:{port}/db", lookup_timeout=2.0)
    assert await cache.lookup("k", 60) is None
    assert cache.misses == 1 and cache.lookup_errors + cache.lookup_timeouts == 1
    cache.remember("k", "m", b"{}")
    await cache.flush()
    assert cache.write_failures == 1
    await cache.close()


def _chunks(*events: dict[str, Any]) -> list[Chunk]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
            "model": "m", "system_fingerprint": "fp"}
    return [chunk_decoder.decode(msgspec.json.encode({**base, **e})) for e in events]


def test_a_finished_stream_is_kept_as_one_answer_and_played_back() -> None:
    """Content and tool-call pieces assemble into one chat.completion with usage; an
    unfinished stream assembles to nothing; playback yields the same answer as chunks."""
    chunks = _chunks(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"a\""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                  "total_tokens": 7}},
    )
    assert assemble(chunks[:-2]) is None
    body = assemble(chunks)
    assert body is not None
    data = any_decoder.decode(body)
    message = data["choices"][0]["message"]
    assert data["object"] == "chat.completion" and data["id"] == "chatcmpl-1"
    assert message["content"] == "Hello"
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": "{\"a\": 1}"}}]
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    assert data["usage"]["total_tokens"] == 7
    events = events_of(completion_decoder.decode(body), include_usage=True)
    again = assemble([e.chunk for e in events])
    assert again is not None and any_decoder.decode(again) == data
    assert [e.more for e in events][-1] is False and all(e.more for e in events[:-1])
    assert {any_decoder.decode(e.raw)["object"] for e in events} == {"chat.completion.chunk"}
    assert events_of(completion_decoder.decode(body), include_usage=False)[-1].chunk.usage \
        is None
    stored = stored_completion(RS.join(e.raw for e in events), "chunks")
    assert stored is not None and any_decoder.decode(stored.body) == data
    assert stored_completion(RS.join(e.raw for e in events[:2]), "chunks") is None


def test_canned_reply_is_marked() -> None:
    """A canned reply says bulwark-canned and names the requested model."""
    completion = canned("Back soon.", "default")
    assert any_decoder.decode(completion.body)["object"] == "chat.completion"
    reply = completion.parsed
    assert reply.system_fingerprint == "bulwark-canned" and reply.model == "default"
    assert reply.choices[0].message.content == "Back soon."
