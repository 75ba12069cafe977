"""Secrets never leave the process: a provider's API key is in no response and no log
line; no provider key, client key or admin token is in any row of any table."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import SimFactory
from tests.procs import Spawn, free_port, wait_live
from tests.scripted import REQUESTS, Reply, scripted_app

SECRET = "sk-live-SECRETVALUE0123456789abcdefXYZ"



async def test_api_key_appears_in_no_response_and_no_log(aiohttp_server: Any,
                                                         tmp_path: Path) -> None:
    """An upstream that echoes our key in a 401 and a 400 cannot make it reach the client
    or the web process's logs (a real `python -m service` process at DEBUG level)."""
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "x"}}
    bad = {"error": {"message": f"bad field; your key {SECRET} is fine", "param": "tools"}}
    upstream = await aiohttp_server(scripted_app([
        Reply.json(echo, status=401), Reply.json(bad, status=400),
        Reply(status=530, body=f"<html>{SECRET}</html>".encode(),
              headers={"Content-Type": "text/html"}),
    ]))
    toml = tmp_path / "providers.toml"
    toml.write_text(f"""
[[providers]]
name = "alpha"
kind = "openai"
base_url = "{upstream.make_url('/v1')}"
api_key_env = "ALPHA_KEY"
retries = 0
[providers.models]
default = "m"
""")
    port = free_port()
    env = {**os.environ, "ALPHA_KEY": SECRET, "BULWARK_PROVIDERS": str(toml),
           "BULWARK_PORT": str(port), "LOG_LEVEL": "DEBUG", "CB_FAIL_THRESHOLD": "100"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", env=env, stderr=asyncio.subprocess.PIPE)
    bodies: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/health/live"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            for _ in range(3):
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                  json={"model": "default",
                                        "messages": [{"role": "user", "content": "hi"}]}) as r:
                    bodies.append(await r.read() + str(dict(r.headers)).encode())
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    # The upstream did receive the key (so it was in play), in the header only.
    assert upstream.app[REQUESTS][0].headers["Authorization"] == f"Bearer {SECRET}"
    assert b"upstream attempt failed" in err  # the failures were logged
    assert SECRET.encode() not in err
    for body in bodies:
        assert SECRET.encode() not in body
    assert b"html" not in bodies[2].lower()


# -- every table, after a realistic run ---------------------------------------------------

BETA_SECRET = "sk-live-BETAVALUE9876543210zyxwvuTSRQ"
CLIENT_KEY = "bwk_live_CLIENTKEY0123456789abcdefGHIJ"
ADMIN_TOKEN = "admin-ADMINTOKEN0123456789abcdefKLMN"
#: Distinctive cores too, so that a truncated copy (a 300-character detail) is caught.
NEEDLES = (SECRET, BETA_SECRET, CLIENT_KEY, ADMIN_TOKEN,
           "SECRETVALUE0123", "BETAVALUE98765", "CLIENTKEY01234", "ADMINTOKEN01234")


async def _until(probe: Any, what: str) -> None:
    for _ in range(400):
        if await probe():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached")  # pragma: no cover


@pytest.mark.slow
async def test_no_secret_in_any_table(aiohttp_server: Any, sim: SimFactory, spawn: Spawn,
                                      db: asyncpg.Connection, pg_clean: str,
                                      tmp_path: Path) -> None:
    """After a realistic run — web and healthd on Postgres, a provider that echoes its key
    in its errors, a healthy one, a client key on every /v1 call, the admin token on every
    /admin call, every GET of the document, a stream and feedback — no column of any row
    of any table holds a provider key, the client key or the admin token."""
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}", "type": "x"}}
    alpha = await aiohttp_server(scripted_app([Reply.json(echo, status=401)]))
    beta = await sim("beta")
    toml = tmp_path / "providers.toml"
    toml.write_text(f"""
[[providers]]
name = "alpha"
kind = "openai"
base_url = "{alpha.make_url('/v1')}"
api_key_env = "ALPHA_KEY"
priority = 1
retries = 0
[providers.models]
default = "m"

[[providers]]
name = "beta"
kind = "openai"
base_url = "{beta.url}"
api_key_env = "BETA_KEY"
priority = 2
[providers.models]
default = "sim-1"
""")
    port = free_port()
    env = {"ALPHA_KEY": SECRET, "BETA_KEY": BETA_SECRET, "BULWARK_ADMIN_TOKEN": ADMIN_TOKEN,
           "LOG_LEVEL": "DEBUG"}
    web = await spawn(pg_clean, toml, module="service", BULWARK_PORT=str(port), **env)
    base = f"http://127.0.0.1:{port}"
    client = {"Authorization": f"Bearer {CLIENT_KEY}"}
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        await wait_live(base)
        # Before healthd runs, so that the web process itself tries alpha (and records its
        # failures) rather than routing around a provider healthd already marked down.
        for i in range(4):
            async with s.post(f"{base}/v1/chat/completions", json=chat,
                              headers={**client, "x-request-id": f"scan-{i}"}) as r:
                assert r.status == 200, await r.text()
        healthd = await spawn(pg_clean, toml, module="healthd", **env)
        async with s.post(f"{base}/v1/chat/completions", json={**chat, "stream": True},
                          headers=client) as r:
            assert b"[DONE]" in await r.read()
        async with s.post(f"{base}/v1/feedback", headers=client, json={
                "request_id": "scan-0", "rating": -1, "comment": "wrong", "tags": ["x"]}) as r:
            assert r.status == 201, await r.text()
        async with s.get(f"{base}/openapi.json") as r:
            doc = await r.json()
        # Not an endless event stream (`/status/events`): it never ends to be read.
        gets = [p for p, ops in doc["paths"].items() if "get" in ops and "{" not in p
                and "text/event-stream" not in ops["get"]["responses"].get("200", {}).get(
                    "content", {})]
        assert "/v1/models" in gets
        for path in gets:
            token = ADMIN_TOKEN if path.startswith("/admin/") else CLIENT_KEY
            async with s.get(f"{base}{path}", headers={"Authorization": f"Bearer {token}"}) as r:
                await r.read()

    async def recorded() -> bool:
        counts = await db.fetchrow(
            "SELECT (SELECT count(*) FROM service_errors WHERE provider = 'alpha') AS errors,"
            " (SELECT count(*) FROM health_samples WHERE provider = 'alpha') AS samples")
        return counts is not None and counts["errors"] > 0 and counts["samples"] > 0
    await _until(recorded, "alpha's failures recorded by web and healthd")
    await web.stop()
    await healthd.stop()
    # The key was in play: the upstream received it (and echoed it back).
    assert alpha.app[REQUESTS][0].headers["Authorization"] == f"Bearer {SECRET}"

    tables = [r["tablename"] for r in await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]
    assert {"feedback", "service_errors", "provider_state", "providers"} <= set(tables)
    scanned = 0
    for table in tables:
        for row in await db.fetch(f'SELECT t::text AS row FROM "{table}" AS t'):
            scanned += 1
            found = [n for n in NEEDLES if n in row["row"]]
            assert not found, f"{table}: {found} in {row['row'][:300]}"
    assert scanned >= 10
