"""The upstream client alone: CPU per chat POST through aiohttp's ClientSession and through
bulwark/http1.py, in one process, against the same canned upstream, rounds interleaved.

    .venv/bin/python -m ops.bench_http1            # ~20 s
    .venv/bin/python -m ops.bench_http1 --requests 50000 --rounds 5

The upstream (`ops/bench_upstream.py`) runs in its own process on another CPU when there
is one; the figure is this process's CPU time (user + system, so the socket calls count)
divided by the requests, for JSON answers and for 20-chunk streams read to their end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bulwark.http1 import Http1
from ops.bench_chat import chat_body, free_port, spawn, stop, wait_ready


async def _aiohttp(url: str, body: bytes, n: int, c: int) -> float:
    connector = aiohttp.TCPConnector(limit=1000, limit_per_host=500)
    headers = {"Content-Type": "application/json", "X-Request-Id": "bench"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                async for _ in resp.content.iter_any():
                    pass

        return await _timed(one, n, c)


async def _http1(url: str, body: bytes, n: int, c: int) -> float:
    client = Http1()
    pool, path = client.target(url)
    headers = {"Content-Type": "application/json", "X-Request-Id": "bench"}

    async def one() -> None:
        async with await client.request(pool, path, body, headers, connect_timeout=5,
                                        idle=None) as resp:
            async for _ in resp.content.iter_any():
                pass

    try:
        return await _timed(one, n, c)
    finally:
        client.close()


async def _timed(one: object, n: int, c: int) -> float:
    assert callable(one)
    await asyncio.gather(*[one() for _ in range(c)])  # connections open, caches warm
    started = time.process_time()
    for _ in range(n // c):
        await asyncio.gather(*[one() for _ in range(c)])
    return (time.process_time() - started) / (n // c * c) * 1e6


async def main_async(args: argparse.Namespace, url: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode in ("json", "stream"):
        body = chat_body(mode)
        runs: dict[str, list[float]] = {"aiohttp": [], "http1": []}
        for _ in range(args.rounds):
            runs["aiohttp"].append(await _aiohttp(url, body, args.requests, args.concurrency))
            runs["http1"].append(await _http1(url, body, args.requests, args.concurrency))
        a, h = statistics.median(runs["aiohttp"]), statistics.median(runs["http1"])
        out[mode] = {"aiohttp_us": round(a, 1), "http1_us": round(h, 1),
                     "ratio": round(h / a, 3)}
        print(f"{mode:6s}  aiohttp ClientSession {a:6.1f} µs/request   bulwark.http1 "
              f"{h:6.1f} µs/request   http1 / aiohttp {h / a:.2f}  "
              f"(median of {args.rounds} interleaved rounds of {args.requests})", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_http1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    port = free_port()
    cpus = sorted(os.sched_getaffinity(0))
    many = len(cpus) > 1
    logs = Path(tempfile.mkdtemp(prefix="bench-http1-"))
    upstream = spawn("upstream", [sys.executable, "-m", "ops.bench_upstream", "--port",
                                  str(port)], env=dict(os.environ),
                     cpus={cpus[-1]} if many else None, logs=logs)
    try:
        if many:
            os.sched_setaffinity(0, {cpus[0]})
        wait_ready(upstream, port, "/health")
        figures = asyncio.run(main_async(args, f"http://127.0.0.1:{port}/v1/chat/completions"))
    finally:
        stop(upstream)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
