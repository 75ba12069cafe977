"""Stream continuation: the seam (property tests) and whole streams through the openai SDK,
the gateway and simulators (or scripted upstreams) on real sockets."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulwark.config import ModelPolicy, Provider, Settings
from bulwark.providers.base import Call
from bulwark.providers.openai import OpenAIAdapter
from bulwark.sim import SIM_STATE, reply_text, reply_words
from bulwark.wire import ChatRequest
from service.app import create_app
from service.continuation import INSTRUCTION, WINDOW, Seam, overlap
from tests.conftest import Gateway, Sim, SimFactory, provider
from tests.scripted import Reply, sse_event, start_upstream

MSG: Any = [{"role": "user", "content": "Hi"}]
#: The simulator cuts a faulty 20-word stream after its first 10 words.
SENT = reply_text("alpha", 10)


# --- the seam ---------------------------------------------------------------------------

_word = st.text(alphabet="abcdefghij", min_size=1, max_size=6)
_words = st.lists(_word, min_size=2, max_size=40, unique=True)


@given(st.text(max_size=300), st.text(max_size=300))
def test_overlap_only_drops_a_real_repeat(sent: str, new: str) -> None:
    """What is dropped is at most WINDOW characters and is exactly the end of the sent text."""
    k = overlap(sent, new)
    assert 0 <= k <= min(WINDOW, len(new))
    if k:
        assert sent.endswith(new[:k])


@given(_words, st.data())
def test_restart_a_few_words_back_rejoins_exactly(words: list[str], data: st.DataObject) -> None:
    """A continuation restarting j whole words back is joined with no word repeated or lost."""
    tokens = [" " + w for w in words]
    i = data.draw(st.integers(1, len(tokens) - 1))
    j = data.draw(st.integers(0, i))
    sent, new = "".join(tokens[:i]), "".join(tokens[i - j:])
    assert sent + new[overlap(sent, new):] == "".join(tokens)


@given(_words, st.data())
def test_restart_of_a_cut_word_rejoins_exactly(words: list[str], data: st.DataObject) -> None:
    """A stream cut inside a word, continued from that word's start, reads as one text."""
    text = " ".join(words)
    start = data.draw(st.sampled_from([i + 1 for i, ch in enumerate(text) if ch == " "]))
    end = text.find(" ", start)
    end = len(text) if end < 0 else end
    cut = data.draw(st.integers(start + 1, max(start + 1, end - 1)))
    sent, new = text[:cut], text[start:]
    assert sent + new[overlap(sent, new):] == text


@given(st.text(alphabet="ab .", max_size=120), st.text(alphabet="ab .", max_size=120),
       st.lists(st.integers(1, 7), max_size=40))
def test_seam_fed_in_pieces_equals_the_whole(sent: str, new: str, cuts: list[int]) -> None:
    """However the continuation is chunked, the seam sends what one decision over it would."""
    seam, out, pos = Seam(sent), [], 0
    for n in cuts:
        out.append(seam.feed(new[pos:pos + n]))
        pos += n
    out.append(seam.feed(new[pos:]))
    out.append(seam.flush())
    assert "".join(out) == new[overlap(sent, new):]


def test_seam_does_not_hold_a_continuation_that_repeats_nothing() -> None:
    """A first piece that cannot start a repeat is sent at once (no added latency)."""
    assert Seam("Hello from sim alpha").feed(" tests") == " tests"


def test_whole_word_rule_keeps_a_longer_word() -> None:
    """"… the" + " theory" is not a repeat; "… the" + " the rest" is."""
    assert overlap("I like the", " theory") == 0
    assert overlap("I like the", " the rest") == 4


# --- whole streams ----------------------------------------------------------------------


async def start_gateway(aiohttp_server: Any, providers: list[Provider], *,
                        continue_streams: bool = True) -> Gateway:
    models = {"default": ModelPolicy(continue_streams=continue_streams)}
    app = create_app(Settings(http_backoff_base_ms=0), providers, models=models, env={})
    return Gateway(await aiohttp_server(app), app)


async def sims(sim: SimFactory, *names: str) -> list[Sim]:
    return [await sim(n) for n in names]


def chat_log(s: Sim) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = msgspec.json.decode(s.server.app[SIM_STATE].log_json())
    return [e for e in entries if e["path"] == "/v1/chat/completions"]


async def stream(gw: Gateway, **kw: Any) -> tuple[list[Any], Any]:
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="default", messages=MSG, stream=True, **kw)
        return [c async for c in raw.parse()], raw.headers


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_one_stream(chunks: list[Any]) -> None:
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    assert len({c.model for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1


async def test_malformed_chunk_is_continued_by_prefill_with_overlap_trimmed(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """A malformed chunk mid-answer: beta continues the prefix; its repeat is trimmed."""
    alpha, beta = await sims(sim, "alpha", "beta")
    await alpha.script(steps=[{"fault": "malformed"}])
    await beta.script(steps=[{"overlap_words": 2}])
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url, priority=1),
        provider("beta", beta.url, priority=2, continuation="prefill")])
    chunks, headers = await stream(gw, stream_options={"include_usage": True})

    rest = "".join(reply_words("beta")[10:])
    produced = "".join(reply_words("alpha")[8:10]) + rest  # beta repeated two words
    assert text_of(chunks) == SENT + rest == SENT + produced[len(" so that"):]
    assert_one_stream(chunks)
    assert headers["x-bulwark-provider"] == "alpha"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert finish[0].model_extra["bulwark"] == {"continued_by": "beta", "at_char": len(SENT)}
    # Usage: beta's prompt, and both parts' completion tokens (alpha's estimated).
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == math.ceil(len(SENT) / 4) + 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    (sent_to_beta,) = chat_log(beta)
    body = sent_to_beta["body"]
    assert body["messages"][-1] == {"role": "assistant", "content": SENT, "prefix": True}
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False


async def test_stall_is_continued_by_instruction(sim: SimFactory, aiohttp_server: Any) -> None:
    """A stall mid-answer: beta is told to continue; one answer, marker, alpha's id."""
    alpha, beta = await sims(sim, "alpha", "beta")
    await alpha.script(steps=[{"fault": "stall"}])
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url, priority=1, timeout_idle_sec=0.3),
        provider("beta", beta.url, priority=2)])
    chunks, _ = await stream(gw)

    assert text_of(chunks) == SENT + "".join(reply_words("beta")[10:])
    assert_one_stream(chunks)
    assert chunks[-1].model_extra["bulwark"] == {"continued_by": "beta", "at_char": len(SENT)}
    (sent_to_beta,) = chat_log(beta)
    messages = sent_to_beta["body"]["messages"]
    assert messages[-2:] == [{"role": "assistant", "content": SENT},
                             {"role": "user", "content": INSTRUCTION}]
    assert "continue_final_message" not in sent_to_beta["body"]


async def test_continuation_that_breaks_is_continued_again(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """beta breaks mid-continuation too: gamma continues from the longer text."""
    alpha, beta, gamma = await sims(sim, "alpha", "beta", "gamma")
    await alpha.script(steps=[{"fault": "error-event"}])
    await beta.script(steps=[{"fault": "malformed"}])
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url, priority=1),
        provider("beta", beta.url, priority=2, continuation="prefill"),
        provider("gamma", gamma.url, priority=3, continuation="prefill")])
    chunks, _ = await stream(gw)

    upto_beta = SENT + "".join(reply_words("beta")[10:15])
    assert text_of(chunks) == upto_beta + "".join(reply_words("gamma")[15:])
    assert_one_stream(chunks)
    assert chunks[-1].model_extra["bulwark"] == {"continued_by": "gamma",
                                                  "at_char": len(upto_beta)}


async def test_off_ends_with_todays_error_event(sim: SimFactory, aiohttp_server: Any) -> None:
    """continue_streams off: the stream ends with the error event; beta is never asked."""
    alpha, beta = await sims(sim, "alpha", "beta")
    await alpha.script(steps=[{"fault": "malformed"}])
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url, priority=1), provider("beta", beta.url, priority=2)],
        continue_streams=False)
    got: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        async with gw.client() as client:
            async for c in await client.chat.completions.create(
                    model="default", messages=MSG, stream=True):
                got.append(c)
    assert info.value.code == "upstream_stream_interrupted"
    assert text_of(got) == SENT
    assert chat_log(beta) == []


async def test_header_turns_continuation_on_and_off(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """`x-bulwark-continue: true` continues a model that does not; `false` stops one that does."""
    alpha, beta = await sims(sim, "alpha", "beta")
    await alpha.script(steps=[{"fault": "malformed"}, {"fault": "malformed"}])
    providers = [provider("alpha", alpha.url, priority=1),
                 provider("beta", beta.url, priority=2)]
    off = await start_gateway(aiohttp_server, providers, continue_streams=False)
    chunks, _ = await stream(off, extra_headers={"x-bulwark-continue": "true"})
    assert chunks[-1].model_extra["bulwark"]["continued_by"] == "beta"

    on = await start_gateway(aiohttp_server, providers, continue_streams=True)
    with pytest.raises(openai.APIError):
        await stream(on, extra_headers={"x-bulwark-continue": "false"})


async def test_nobody_able_to_continue_ends_with_the_error_event(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """Every other provider fails: the original failure's error event, after alpha's text."""
    alpha, beta = await sims(sim, "alpha", "beta")
    await alpha.script(steps=[{"fault": "stall"}])
    await beta.script(then={"status": 503})
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url, priority=1, timeout_idle_sec=0.3),
        provider("beta", beta.url, priority=2, retries=1)])
    got: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        async with gw.client() as client:
            async for c in await client.chat.completions.create(
                    model="default", messages=MSG, stream=True):
                got.append(c)
    assert info.value.code == "upstream_stream_stalled"
    assert text_of(got) == SENT
    assert len(chat_log(beta)) == 2  # one try and its retry, within the attempt cap


async def test_tool_call_stream_is_not_continued(sim: SimFactory, aiohttp_server: Any) -> None:
    """A stream that sent a tool-call delta ends with the error event; nobody continues it."""
    (beta,) = await sims(sim, "beta")
    base = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1,
            "model": "m"}
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"ci'}}
    alpha = await start_upstream(aiohttp_server, [Reply(sse=[
        sse_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        sse_event({**base, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}),
    ], reset=True)])
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url(), priority=1, retries=0),
        provider("beta", beta.url, priority=2)])
    with pytest.raises(openai.APIError) as info:
        await stream(gw)
    assert info.value.code == "upstream_stream_interrupted"
    assert chat_log(beta) == []


async def test_anthropic_continues_the_final_assistant_turn(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """An Anthropic provider gets the partial answer as its final assistant turn (prefill)."""
    (alpha,) = await sims(sim, "alpha")
    await alpha.script(steps=[{"fault": "malformed"}])
    events = [
        sse_event({"type": "message_start", "message": {
            "type": "message", "content": [], "usage": {"input_tokens": 30,
                                                        "output_tokens": 1}}},
                  event="message_start"),
        sse_event({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, event="content_block_start"),
        sse_event({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": " that tests"}},
                  event="content_block_delta"),
        sse_event({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": " pass."}},
                  event="content_block_delta"),
        sse_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": 4}}, event="message_delta"),
        sse_event({"type": "message_stop"}, event="message_stop"),
    ]
    claude = await start_upstream(aiohttp_server, [Reply(sse=events)])
    gw = await start_gateway(aiohttp_server, [
        provider("alpha", alpha.url, priority=1),
        provider("claude", claude.url(), priority=2, kind="anthropic")])
    chunks, _ = await stream(gw)

    assert text_of(chunks) == SENT + " tests pass."
    assert_one_stream(chunks)
    assert chunks[-1].model_extra["bulwark"] == {"continued_by": "claude", "at_char": len(SENT)}
    (req,) = claude.requests
    assert req.json()["messages"][-1] == {"role": "assistant", "content": SENT}


async def test_prefill_body_per_openai_compatible_dialect() -> None:
    """Mistral gets only `prefix: true`; other OpenAI-compatible servers also get vLLM's flags."""
    chat = msgspec.convert({"model": "default", "stream": True, "messages": [
        *MSG, {"role": "assistant", "content": "Hello"}]}, ChatRequest)
    call = Call(request=chat, upstream_model="m", request_id="r", prefill=True)
    async with aiohttp.ClientSession() as session:
        bodies = {url: msgspec.json.decode(OpenAIAdapter(
            provider("p", url), session, retry_after_cap=1.0)._body(call, stream=True))
            for url in ("https://api.mistral.ai/v1", "http://127.0.0.1:8000/v1")}
    mistral, vllm = bodies.values()
    assert mistral["messages"][-1] == {"role": "assistant", "content": "Hello", "prefix": True}
    assert "continue_final_message" not in mistral
    assert vllm["continue_final_message"] is True and vllm["add_generation_prompt"] is False
