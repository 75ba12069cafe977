"""What a stream continuation costs the client: the added latency at the seam.

    .venv/bin/python -m ops.bench_continuation              # ~30 s
    .venv/bin/python -m ops.bench_continuation --requests 300 --pace-ms 2

Processes: two simulators (`alpha`, priority 1; `beta`, priority 2, `continuation =
"prefill"`) and one gateway (`python -m service`, no database, `continue_streams = true`),
each its own process on loopback; this process is the client (aiohttp, one request at a
time). Both simulators pace their 20 content chunks `--pace-ms` apart, as a provider sends
tokens. alpha's script cycles: one stream in three ends after 10 chunks with its own error
event (the failure is seen at once, so what is measured is the seam, not an idle timeout),
the other two are healthy — which keeps alpha's breaker closed (33 % < its 50 % rate) and
gives the baseline in the same run, interleaved.

Reported, p50 / p99 in milliseconds:

- `seam span`: in a continued stream, the time from alpha's 9th chunk to the first chunk
  of beta's continuation (the 11th), as the client sees it. Two gaps, not one: alpha's
  10th chunk arrives in the same read as its error event, so the gateway holds it for
  that read's next event (`StreamEvent.more`) and it reaches the client with beta's first;
- `chunk span`: in a healthy stream, the time between the same two chunks (9th → 11th);
- `fresh TTFT`: a healthy stream's time to its first content chunk — what a client pays to
  start over, before paying for the whole answer again;
- `whole stream`: healthy vs continued, request to [DONE].

"added at the seam" = seam span − chunk span; ratios are against the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CUT = 10  # the simulator cuts a faulty 20-chunk stream after 10 content chunks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")


async def one(session: aiohttp.ClientSession, url: str) -> tuple[list[float], float, bool]:
    """Arrival times (s from the request) of each content chunk, the whole duration, and
    whether the stream was continued."""
    body = {"model": "default", "stream": True,
            "messages": [{"role": "user", "content": "Hi"}]}
    start = time.perf_counter()
    times: list[float] = []
    continued = False
    async with session.post(url, json=body) as resp:
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk}")
            for c in chunk.get("choices", []):
                if c.get("delta", {}).get("content"):
                    times.append(time.perf_counter() - start)
            continued = continued or "bulwark" in chunk
    return times, time.perf_counter() - start, continued


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def line(name: str, values: list[float]) -> str:
    return f"{name:<22} p50 {pct(values, 0.5):7.2f} ms   p99 {pct(values, 0.99):7.2f} ms"


async def run(args: argparse.Namespace) -> int:
    py = sys.executable
    ports = {"alpha": free_port(), "beta": free_port(), "gateway": free_port()}
    logs = Path(tempfile.mkdtemp(prefix="bench-continuation-"))
    providers = logs / "providers.toml"
    providers.write_text(f"""
[[providers]]
name = "alpha"
kind = "sim"
base_url = "http://127.0.0.1:{ports['alpha']}/v1"
priority = 1
retries = 0
[providers.models]
default = "sim-1"

[[providers]]
name = "beta"
kind = "sim"
base_url = "http://127.0.0.1:{ports['beta']}/v1"
priority = 2
continuation = "prefill"
[providers.models]
default = "sim-1"

[models.default]
continue_streams = true
""")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PORT")}
    env.update({"BULWARK_PROVIDERS": str(providers), "BULWARK_PORT": str(ports["gateway"]),
                "LOG_LEVEL": "ERROR", "CB_FAIL_THRESHOLD": "1000"})
    procs = [spawn([py, "-m", "bulwark.sim", "--port", str(ports[n]), "--name", n], env,
                   logs / f"{n}.log") for n in ("alpha", "beta")]
    procs.append(spawn([py, "-m", "service"], env, logs / "gateway.log"))
    pace = {"chunk_delay_ms": args.pace_ms}
    try:
        async with aiohttp.ClientSession() as s:
            for name in ("alpha", "beta", "gateway"):
                path = "/health" if name != "gateway" else "/health/live"
                await wait_ready(s, f"http://127.0.0.1:{ports[name]}{path}")
            cycles = args.requests // 3 + 1
            steps = [{"fault": "error-event", **pace}, pace, pace] * cycles
            for name, script in (("alpha", {"steps": steps, "then": pace}),
                                 ("beta", {"then": pace})):
                async with s.post(f"http://127.0.0.1:{ports[name]}/_sim/script",
                                  json=script) as resp:
                    assert resp.status == 200, await resp.text()
            url = f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions"
            for _ in range(20):  # warm-up: connections, first-call paths
                await one(s, url)
            seam, gap, ttft, whole_ok, whole_cont = [], [], [], [], []
            for _ in range(args.requests):
                times, whole, continued = await one(s, url)
                if continued:
                    seam.append(times[CUT] - times[CUT - 2])
                    whole_cont.append(whole)
                else:
                    gap.append(times[CUT] - times[CUT - 2])
                    ttft.append(times[0])
                    whole_ok.append(whole)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"requests: {args.requests} ({len(seam)} continued, {len(gap)} healthy); "
          f"chunks paced {args.pace_ms} ms apart; cpus: {os.cpu_count()}")
    print(line("seam span (continued)", seam))
    print(line("chunk span (healthy)", gap))
    print(line("fresh TTFT (healthy)", ttft))
    print(line("whole stream, healthy", whole_ok))
    print(line("whole stream, contin.", whole_cont))
    added50 = pct(seam, 0.5) - pct(gap, 0.5)
    added99 = pct(seam, 0.99) - pct(gap, 0.99)
    print(f"added at the seam: p50 {added50:.2f} ms, p99 {added99:.2f} ms")
    print(f"seam span / fresh TTFT: p50 {pct(seam, 0.5) / pct(ttft, 0.5):.2f}x, "
          f"p99 {pct(seam, 0.99) / pct(ttft, 0.99):.2f}x")
    print(f"whole stream continued / healthy: p50 "
          f"{statistics.median(whole_cont) / statistics.median(whole_ok):.2f}x")
    return 0 if seam and gap else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_continuation")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--pace-ms", type=float, default=1.0)
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
