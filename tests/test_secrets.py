"""A provider's API key never leaves the process: not in responses, not in log lines."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.scripted import REQUESTS, Reply, scripted_app

SECRET = "sk-live-SECRETVALUE0123456789abcdefXYZ"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
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
