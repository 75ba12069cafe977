"""`POST /v1/embeddings` end to end: the openai SDK → the gateway → simulators, a
Gemini-shaped scripted upstream and an Anthropic provider (which has no embeddings)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import aiohttp
import openai
import pytest

from bulwark.config import ModelPolicy, Provider, Settings
from bulwark.embeddings import MAX_INPUT_CHARS, MAX_INPUTS
from bulwark.sim import SIM_STATE, embedding_vector
from service.app import create_app
from tests.conftest import Gateway, Sim, SimFactory, provider
from tests.scripted import Reply, refused_url, start_upstream

MODELS = {"default": "sim-1"}
KEY = "AIzaSyTESTKEY-abcdefghijklmnopqrstu"


async def start_gateway(aiohttp_server: Any, providers: list[Provider], *,
                        dims: int | None = None, env: dict[str, str] | None = None) -> Gateway:
    models = {"default": ModelPolicy(embedding_dimensions=dims)}
    app = create_app(Settings(http_backoff_base_ms=0), providers, models=models, env=env or {})
    return Gateway(await aiohttp_server(app), app)


async def two(sim: SimFactory, aiohttp_server: Any, **alpha: Any) -> tuple[Sim, Sim, Gateway]:
    a, b = await sim("alpha"), await sim("beta")
    gw = await start_gateway(aiohttp_server, [provider("alpha", a.url, priority=1, **alpha),
                                              provider("beta", b.url, priority=2)])
    return a, b, gw


async def post(gw: Gateway, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(f"{gw.base_url}/embeddings",
                                                    json=body) as resp:
        return resp.status, await resp.json()


async def test_float_embeddings_through_the_sdk(sim: SimFactory, aiohttp_server: Any) -> None:
    """A list input is answered in order, as floats, with usage and the x-bulwark headers."""
    _, _, gw = await two(sim, aiohttp_server)
    async with gw.client() as client:
        raw = await client.embeddings.with_raw_response.create(
            model="default", input=["first", "second"], encoding_format="float")
    res = raw.parse()
    assert [d.index for d in res.data] == [0, 1]
    assert res.data[0].embedding == pytest.approx(embedding_vector("alpha", "first", 8))
    assert res.data[1].embedding == pytest.approx(embedding_vector("alpha", "second", 8))
    assert res.model == "default"
    assert res.usage.prompt_tokens == res.usage.total_tokens == 4
    assert raw.headers["x-bulwark-provider"] == "alpha"
    assert raw.headers["x-bulwark-attempts"] == "1"
    assert raw.headers["x-bulwark-fallback"] == "none"
    assert raw.headers["x-request-id"]


async def test_base64_is_little_endian_float32(sim: SimFactory, aiohttp_server: Any) -> None:
    """The SDK's default (base64) decodes to the same vector; on the wire it is LE float32."""
    _, _, gw = await two(sim, aiohttp_server)
    expected = embedding_vector("alpha", "hello", 8)
    async with gw.client() as client:
        res = await client.embeddings.create(model="default", input="hello")
    assert res.data[0].embedding == pytest.approx(expected, rel=1e-6)
    status, body = await post(gw, {"model": "default", "input": "hello",
                                   "encoding_format": "base64"})
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == pytest.approx(expected, rel=1e-6)


async def test_dimensions_and_token_arrays_pass_through(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """`dimensions` and token-array inputs reach an OpenAI-compatible provider as sent."""
    a, _, gw = await two(sim, aiohttp_server)
    async with gw.client() as client:
        res = await client.embeddings.create(model="default", input=[[1, 2, 3], [4]],
                                             dimensions=12, encoding_format="float")
    assert [len(d.embedding) for d in res.data] == [12, 12]
    assert res.usage.prompt_tokens == 4
    sent = a.server.app[SIM_STATE].log[-1][3]  # the raw request body
    assert b'"input":[[1,2,3],[4]]' in sent and b'"dimensions":12' in sent


async def test_fails_over_on_503(sim: SimFactory, aiohttp_server: Any) -> None:
    """An upstream 503 fails over to the next provider, as for chat."""
    a, _, gw = await two(sim, aiohttp_server, retries=0)
    await a.script(steps=[{"status": 503}])
    async with gw.client() as client:
        raw = await client.embeddings.with_raw_response.create(model="default", input="x")
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert raw.headers["x-bulwark-attempts"] == "2"
    assert raw.headers["x-bulwark-fallback"] == "failover"
    assert raw.parse().data[0].embedding == pytest.approx(embedding_vector("beta", "x", 8))


async def test_malformed_answer_is_retried(sim: SimFactory, aiohttp_server: Any) -> None:
    """A malformed body is retried on the same provider (one retry), like a chat answer."""
    a, _, gw = await two(sim, aiohttp_server, retries=1)
    await a.script(steps=[{"fault": "malformed"}])
    async with gw.client() as client:
        raw = await client.embeddings.with_raw_response.create(model="default", input="x")
    assert (raw.headers["x-bulwark-provider"], raw.headers["x-bulwark-attempts"]) == ("alpha",
                                                                                      "2")


async def test_wrong_size_fails_over_to_a_matching_provider(
        sim: SimFactory, aiohttp_server: Any) -> None:
    """With embedding_dimensions = 16, a provider answering 8 dimensions is skipped."""
    a, b = await sim("alpha"), await sim("beta")
    await b.script(then={"dims": 16})
    gw = await start_gateway(aiohttp_server, [provider("alpha", a.url, priority=1, retries=0),
                                              provider("beta", b.url, priority=2)], dims=16)
    async with gw.client() as client:
        raw = await client.embeddings.with_raw_response.create(
            model="default", input="x", encoding_format="float")
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert len(raw.parse().data[0].embedding) == 16


async def test_anthropic_has_none_and_fails_over(sim: SimFactory, aiohttp_server: Any) -> None:
    """Anthropic is `unsupported` (no call made): the next provider answers; alone, a 400."""
    b = await sim("beta")
    claude = provider("claude", refused_url(), priority=1, kind="anthropic")
    gw = await start_gateway(aiohttp_server, [claude, provider("beta", b.url, priority=2)])
    async with gw.client() as client:
        raw = await client.embeddings.with_raw_response.create(model="default", input="x")
    assert raw.headers["x-bulwark-provider"] == "beta"
    assert raw.headers["x-bulwark-fallback"] == "failover"

    alone = await start_gateway(aiohttp_server, [claude])
    status, body = await post(alone, {"model": "default", "input": "x"})
    assert status == 400
    assert body["error"]["code"] == "unsupported_parameter"
    assert body["error"]["param"] == "model"


async def test_gemini_batch_embed_contents(sim: SimFactory, aiohttp_server: Any) -> None:
    """Gemini gets batchEmbedContents (key in a header, outputDimensionality); token arrays
    are unsupported there and fail over."""
    vectors = [[0.5, -0.25, 0.125], [1.0, 0.0, -1.0]]
    up = await start_upstream(aiohttp_server, [Reply.json(
        {"embeddings": [{"values": v} for v in vectors]})])
    b = await sim("beta")
    gemini = provider("gemini", up.url("/v1beta"), priority=1, kind="gemini",
                      api_key_env="GEMINI_API_KEY", models={"default": "text-embedding-004"})
    gw = await start_gateway(aiohttp_server, [gemini, provider("beta", b.url, priority=2)],
                             env={"GEMINI_API_KEY": KEY})
    async with gw.client() as client:
        raw = await client.embeddings.with_raw_response.create(
            model="default", input=["a", "b"], dimensions=3)
        res = raw.parse()
        assert [d.embedding for d in res.data] == vectors
        assert raw.headers["x-bulwark-provider"] == "gemini"
        (rec,) = up.requests
        assert rec.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
        assert rec.headers["x-goog-api-key"] == KEY
        assert rec.json() == {"requests": [
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]},
             "outputDimensionality": 3} for t in ("a", "b")]}

        tokens = await client.embeddings.with_raw_response.create(model="default",
                                                                  input=[[1, 2]])
    assert tokens.headers["x-bulwark-provider"] == "beta"
    assert len(up.requests) == 1


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": ""}, "input", "invalid_input"),
    ({"input": []}, "input", "invalid_input"),
    ({"input": ["ok", ""]}, "input[1]", "invalid_input"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", "too_many_inputs"),
    ({"input": ["ok", "x" * (MAX_INPUT_CHARS + 1)]}, "input[1]", "input_too_long"),
    ({"input": ["ok", [1, 2]]}, "input[1]", "invalid_input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_request"),
    ({"input": "x", "dimension": 3}, "dimension", "invalid_request"),
])
async def test_bad_input_is_a_400_naming_the_param(
        sim: SimFactory, aiohttp_server: Any, body: dict[str, Any], param: str,
        code: str) -> None:
    """Empty, too many, too long or malformed inputs are refused before any upstream call."""
    a, _, gw = await two(sim, aiohttp_server)
    status, err = await post(gw, {"model": "default", **body})
    assert status == 400
    assert (err["error"]["param"], err["error"]["code"]) == (param, code)
    assert (await a.stats())["chat"] == 0


async def test_unknown_model_is_a_404(sim: SimFactory, aiohttp_server: Any) -> None:
    """A model no provider lists is model_not_found, as for chat."""
    _, _, gw = await two(sim, aiohttp_server)
    with pytest.raises(openai.NotFoundError):
        async with gw.client() as client:
            await client.embeddings.create(model="nope", input="x")
