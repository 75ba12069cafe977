"""WebSocket chat benchmarks: deltas per CPU-second against SSE, and idle sockets' memory.

    .venv/bin/python -m ops.bench_ws                 # both parts, ~1 minute
    .venv/bin/python -m ops.bench_ws --sockets 2000  # a quicker memory check

Processes, each on its own: the simulator (`python -m ops.sim`), one gateway
(`python -m service`, no database, its provider `bench` pointing at the simulator), and this
process as the client. With 2+ CPUs the gateway gets one CPU, the simulator and the client
share the other.

1. Throughput. The same answers (the simulator's default 20-chunk stream, written back to
   back, so the gateway reads several events at once — `stream` in ops/bench_chat.py) are
   fetched over SSE (`POST /v1/chat/completions`, `stream: true`) and over WebSocket (`chat`
   frames on `GET /v1/ws`), `--concurrency` at a time: over SSE as many connections, over
   WebSocket as many sockets with one request each, and (`ws-mux`) a quarter as many
   sockets with four requests each. Rounds alternate SSE / WS / WS-mux `--rounds` times
   for `--duration` seconds each. The figure is deltas (chunk events the client receives)
   per CPU-second of the gateway (its on-CPU time from /proc/<pid>/task/*/schedstat over
   the window), so it does not depend on how fast this client is; the ratio WS / SSE is of
   the medians.
2. Memory. `--sockets` WebSockets are opened on a fresh gateway and each subscribes to
   `providers` and `degradation`, then sit idle (heartbeats on). Reported: the gateway's RSS
   before and with them open, and per socket. The client is a minimal asyncio protocol
   (fixed handshake, one pre-masked subscribe frame) from 127.0.0.x source addresses, so
   that ephemeral ports never run out; RLIMIT_NOFILE is raised to the hard limit first
   (the gateway inherits it). The same is measured on a bare aiohttp WebSocket handler
   (`--bare-ws-server`): what a socket costs when aiohttp keeps it, the reference the
   gateway's own sockets (service/wsconn.py) are compared with.

Exit status 0 when both parts ran (targets met or not), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ops.bench_chat import Proc, cpu_ns, free_port, placement, spawn, status_kib, stop, wait_ready

BODY = (b'{"model":"default","messages":[{"role":"user","content":"Say hello in twenty words."}],'
        b'"stream":true}')
WS_CHAT = b'{"type":"chat","id":"%d","request":' + BODY + b"}"


@dataclass
class Round:
    mode: str
    deltas: int
    cpu_s: float
    wall_s: float

    @property
    def per_cpu_s(self) -> float:
        return self.deltas / self.cpu_s if self.cpu_s else 0.0


class Load:
    """Clients that keep requests in flight until `stop` and count the deltas they get."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.deltas = 0
        self.stop = False

    async def sse(self, session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        while not self.stop:
            async with session.post(url, data=BODY,
                                    headers={"Content-Type": "application/json"}) as resp:
                body = await resp.read()
                assert resp.status == 200, body[:200]
            # Every event but [DONE] is a chunk: what a WebSocket delta frame carries.
            self.deltas += body.count(b"data: {")

    async def ws(self, session: aiohttp.ClientSession, in_flight: int) -> None:
        async with session.ws_connect(f"ws://127.0.0.1:{self.port}/v1/ws") as ws:
            n = 0
            for _ in range(in_flight):
                n += 1
                await ws.send_str((WS_CHAT % n).decode())
            while True:
                msg = await ws.receive()
                data = msg.data
                if data.startswith('{"type":"delta"'):
                    self.deltas += 1
                elif data.startswith('{"type":"done"'):
                    if self.stop:
                        in_flight -= 1
                        if not in_flight:
                            return
                        continue
                    n += 1
                    await ws.send_str((WS_CHAT % n).decode())
                elif data.startswith('{"type":"error"'):
                    raise RuntimeError(data[:300])


async def one_round(mode: str, port: int, pid: int, concurrency: int,
                    duration: float) -> Round:
    load = Load(port)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        if mode == "sse":
            tasks = [asyncio.create_task(load.sse(session)) for _ in range(concurrency)]
        elif mode == "ws":
            tasks = [asyncio.create_task(load.ws(session, 1)) for _ in range(concurrency)]
        else:
            tasks = [asyncio.create_task(load.ws(session, 4))
                     for _ in range(max(1, concurrency // 4))]
        await asyncio.sleep(min(1.0, duration / 4))  # warm: connections open, steady state
        d0, c0, t0 = load.deltas, cpu_ns(pid), time.monotonic()
        await asyncio.sleep(duration)
        d1, c1, t1 = load.deltas, cpu_ns(pid), time.monotonic()
        load.stop = True
        await asyncio.gather(*tasks)
    return Round(mode, d1 - d0, (c1 - c0) / 1e9, t1 - t0)


# ---- idle sockets -------------------------------------------------------------------------


def _masked_text(payload: bytes) -> bytes:
    # A client's frames must be masked (RFC 6455 5.3); a zero mask is a valid mask.
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


_SUBSCRIBE = _masked_text(b'{"type":"subscribe","topics":["providers","degradation"]}')


class _Idle(asyncio.Protocol):
    """One idle subscribed socket: handshake, subscribe, then nothing but pongs."""

    def __init__(self, ready: asyncio.Future[None], request: bytes) -> None:
        self.ready = ready
        self.request = request
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.upgraded:
            self.buf += data
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.ready.done():
                    self.ready.set_exception(RuntimeError(head[:200].decode()))
                return
            self.upgraded = True
            self.buf = rest
            self.transport.write(_SUBSCRIBE)
            data = b""
        self.buf += data
        # Two event frames (the degradation snapshot) mean the subscription is in place.
        if not self.ready.done() and self.buf.count(b'"type":"event"') >= 2:
            self.ready.set_result(None)
        if len(self.buf) > 4096:
            self.buf = b""
        # Answer pings with a pong (masked, empty) so that heartbeats keep the socket open.
        if b"\x89\x00" in data:
            self.transport.write(b"\x8a\x80\0\0\0\0")


async def idle_sockets(port: int, n: int) -> list[asyncio.Transport]:
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    transports: list[asyncio.Transport] = []
    batch = 200  # opened this many at a time: the accept backlog is not a benchmark
    for start in range(0, n, batch):
        futures = []
        for i in range(start, min(n, start + batch)):
            ready: asyncio.Future[None] = loop.create_future()
            source = f"127.0.0.{2 + i % 250}"
            transport, _ = await loop.create_connection(
                functools.partial(_Idle, ready, request), "127.0.0.1", port,
                local_addr=(source, 0))
            transports.append(transport)
            futures.append(ready)
        await asyncio.wait_for(asyncio.gather(*futures), 60)
    return transports


# ---- the rig -------------------------------------------------------------------------------


class Rig:
    def __init__(self, logs: Path, cpus: tuple[set[int] | None, set[int] | None]) -> None:
        self.logs = logs
        self.server_cpus, self.helper_cpus = cpus
        self.procs: list[Proc] = []
        self.sim_port = free_port()
        py = sys.executable
        self.sim = spawn("sim", [py, "-m", "bulwark.sim", "--port", str(self.sim_port),
                                 "--name", "bench"], env=dict(os.environ),
                         cpus=self.helper_cpus, logs=logs)
        self.procs.append(self.sim)
        wait_ready(self.sim, self.sim_port, "/health")
        self.providers = logs / "providers.toml"
        self.providers.write_text(
            f'[[providers]]\nname = "bench"\nkind = "openai"\n'
            f'base_url = "http://127.0.0.1:{self.sim_port}/v1"\n'
            f'[providers.models]\ndefault = "sim-1"\n')

    def gateway(self, name: str) -> tuple[Proc, int]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PORT")}
        env.update(BULWARK_PROVIDERS=str(self.providers), BULWARK_PORT=str(port),
                   LOG_LEVEL="WARNING")
        proc = spawn(name, [sys.executable, "-m", "service"], env=env, cpus=self.server_cpus,
                     logs=self.logs)
        self.procs.append(proc)
        wait_ready(proc, port, "/health/live")
        return proc, port

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


async def throughput(rig: Rig, args: argparse.Namespace) -> dict[str, float]:
    gw, port = rig.gateway("gateway-throughput")
    rounds: list[Round] = []
    modes = ("sse", "ws", "ws-mux")
    for _ in range(args.rounds):
        for mode in modes:
            r = await one_round(mode, port, gw.pid, args.concurrency, args.duration)
            rounds.append(r)
            print(f"  {mode:6s} {r.deltas / r.wall_s:9.0f} deltas/s  "
                  f"{r.per_cpu_s:9.0f} deltas per gateway CPU-second  "
                  f"(gateway CPU {100 * r.cpu_s / r.wall_s:.0f} %)", flush=True)
    stop(gw)
    return {m: statistics.median(r.per_cpu_s for r in rounds if r.mode == m) for m in modes}


def bare_ws_server(port: int) -> None:
    """The reference: aiohttp's own WebSocket with the options the gateway used before it
    took sockets from aiohttp (heartbeat, no compression), and a handler that answers a
    subscribe with two event frames, nothing else — the least any aiohttp-kept socket
    costs, so the honest yardstick for ours."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, compress=False)
        await ws.prepare(request)
        async for _ in ws:
            await ws.send_str('{"type":"event","topic":"degradation","data":null}')
            await ws.send_str('{"type":"event","topic":"degradation","data":null}')
        return ws

    app = web.Application()
    app.router.add_get("/v1/ws", handler)
    app.router.add_get("/health/live", lambda _: web.Response(text="ok"))  # type: ignore[arg-type, return-value]
    import uvloop
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                loop=uvloop.new_event_loop())


async def memory_bare(rig: Rig, n: int) -> tuple[int, int]:
    port = free_port()
    proc = spawn("bare-ws", [sys.executable, "-m", "ops.bench_ws", "--bare-ws-server",
                             str(port)], env=dict(os.environ), cpus=rig.server_cpus,
                 logs=rig.logs)
    rig.procs.append(proc)
    wait_ready(proc, port, "/health/live")
    return await _rss_with_sockets(proc, port, n)


async def memory(rig: Rig, n: int) -> tuple[int, int]:
    gw, port = rig.gateway("gateway-memory")
    # One chat first, so that what a first request loads (code, pools) is in the baseline.
    async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://127.0.0.1:{port}/v1/ws") as ws:
        await ws.send_str((WS_CHAT % 1).decode())
        while not (await ws.receive()).data.startswith('{"type":"done"'):
            pass
    return await _rss_with_sockets(gw, port, n)


async def _rss_with_sockets(proc: Proc, port: int, n: int) -> tuple[int, int]:
    """The server's RSS (KiB) settled, then with `n` idle sockets open; then it stops."""
    await asyncio.sleep(0.5)
    before = status_kib(proc.pid, "VmRSS")
    transports = await idle_sockets(port, n)
    await asyncio.sleep(1.0)
    after = status_kib(proc.pid, "VmRSS")
    for t in transports:
        t.abort()
    stop(proc)
    return before, after


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def main_async(args: argparse.Namespace) -> int:
    limit = raise_nofile()
    if args.sockets + 100 > limit:
        print(f"RLIMIT_NOFILE hard limit {limit} < {args.sockets} sockets", file=sys.stderr)
        return 1
    server, upstream, _ = placement(args.no_pin)
    logs = Path(tempfile.mkdtemp(prefix="bench-ws-"))
    if upstream is not None:
        os.sched_setaffinity(0, upstream)  # the client shares the simulator's CPU
    rig = Rig(logs, (server, upstream))
    try:
        print(f"throughput: concurrency {args.concurrency}, {args.rounds} × "
              f"{args.duration:.0f} s per mode, 20-chunk answers", flush=True)
        med = await throughput(rig, args)
        print(f"median deltas per gateway CPU-second: SSE {med['sse']:.0f}, "
              f"WS {med['ws']:.0f} ({med['ws'] / med['sse']:.2f}× SSE), "
              f"WS-mux {med['ws-mux']:.0f} ({med['ws-mux'] / med['sse']:.2f}× SSE); "
              "target ≥ 1×", flush=True)
        before, after = await memory(rig, args.sockets)
        per = (after - before) * 1024 / args.sockets
        verdict = "met" if after <= 150 * 1024 else "missed"
        print(f"memory: RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with "
              f"{args.sockets} idle subscribed sockets ({per / 1024:.1f} KiB per socket); "
              f"target ≤ 150 MiB: {verdict}", flush=True)
        b0, b1 = await memory_bare(rig, args.sockets)
        bare = (b1 - b0) * 1024 / args.sockets
        print(f"bare aiohttp WebSocket: RSS {b0 / 1024:.1f} MiB before, {b1 / 1024:.1f} MiB "
              f"with {args.sockets} ({bare / 1024:.1f} KiB per socket); the gateway's "
              f"sockets cost {per / bare:.2f}× aiohttp's bare ones", flush=True)
    finally:
        rig.close()
    print(f"logs: {logs}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_ws", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--bare-ws-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_ws_server:
        bare_ws_server(args.bare_ws_server)
        return 0
    try:
        return asyncio.run(main_async(args))
    except (RuntimeError, OSError, TimeoutError, AssertionError) as err:
        print(f"bench_ws failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
