"""When every provider is down, across real web processes sharing one Postgres: a stored
answer (written by one process, served by the other), the canned reply only for a client
that opted in, and otherwise today's 503."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Sim, SimFactory
from tests.procs import Spawn, free_port, until
from tests.test_cluster import start_web

pytestmark = pytest.mark.slow

CANNED = "Our assistant is briefly unavailable; please try again in a minute."


def providers_file(path: Path, alpha: Sim) -> Path:
    path.write_text(f"""
[[providers]]
name = "alpha"
kind = "openai"
base_url = "{alpha.url}"
retries = 0
[providers.models]
default = "sim-1"

[models.default]
cache = "fallback"
canned_reply = "{CANNED}"
""")
    return path


def chat(text: str) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": text}]}


async def post(base: str, body: dict[str, Any], **headers: str
               ) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_every_provider_down_cache_canned_or_503(
        sim: SimFactory, spawn: Spawn, pg_clean: str, tmp_path: Path) -> None:
    """Web A answers and stores; with the provider down, web B serves A's stored answer
    (x-bulwark-fallback: cache, its age); a new question gets the canned reply only with
    x-bulwark-accept-canned: true, and a 503 without it."""
    alpha = await sim("alpha")
    providers = providers_file(tmp_path / "p.toml", alpha)
    a = await start_web(spawn, pg_clean, providers, free_port())
    b = await start_web(spawn, pg_clean, providers, free_port())
    status, fresh, headers = await post(a.base, chat("What is a bulwark?"))
    assert (status, headers["x-bulwark-fallback"]) == (200, "none")
    await alpha.script(then={"status": 503})

    async def served_from_cache() -> tuple[int, dict[str, Any], dict[str, str]] | None:
        got = await post(b.base, chat("What is a bulwark?"))
        return got if got[0] == 200 else None  # until A's batched write has landed
    status, stored, headers = await until(served_from_cache, what="B serves A's answer")
    assert headers["x-bulwark-fallback"] == "cache"
    assert int(headers["x-bulwark-cache-age"]) >= 0
    assert stored["choices"][0]["message"]["content"] == (
        fresh["choices"][0]["message"]["content"])

    status, canned, headers = await post(b.base, chat("Something new"),
                                         **{"x-bulwark-accept-canned": "true"})
    assert (status, headers["x-bulwark-fallback"]) == (200, "canned")
    assert canned["choices"][0]["message"]["content"] == CANNED
    assert canned["system_fingerprint"] == "bulwark-canned"
    status, err, headers = await post(a.base, chat("Something new"))
    assert (status, err["error"]["code"]) == (503, "no_provider_available")
    assert "Retry-After" in headers
