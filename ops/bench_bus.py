"""State-bus benchmark: how fast a breaker/health change reaches another process's view,
and how fast a process whose listener died is back in sync.

    python -m ops.bench_bus [--count 1000] [--rate 500] [--resyncs 10] [--freezes 10]

Two processes on one Postgres (`DATABASE_URL`, else a throwaway embedded cluster):
process A (this one) publishes through its `Bus`, process B (a child) applies the
notifications to its `View` and stamps each row as its subscriber sees it. Both sides
use `time.time()` on the same machine, so latency = B applied − A started the publish
(the publish transaction included).

Phases:
- propagation, burst: A publishes `--count` changes back to back (alternately a breaker
  and a health change, over 8 providers);
- propagation, paced: the same at `--rate` per second, a steadier load than a burst;
- resync after pg_terminate_backend: A writes a change *without* notifying (B can only
  learn it by reloading), then kills B's listener backend; time until B's view holds it;
- resync after SIGSTOP (embedded cluster only, its pids are local): the listener backend
  freezes instead, which fires no event; only the heartbeat notices, so the bound is
  heartbeat_sec + heartbeat_timeout_sec (0.5 s + 1 s by default; see --heartbeat-sec).

With DATABASE_URL the rows it writes use unique provider names and are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from bulwark.bus import Bus
from bulwark.pgembed import EmbeddedPostgres
from bulwark.state import StateRow, View
from schema.migrate import migrate

PROVIDERS = 8  # spread over several rows, as a real deployment has several providers
COLLECT_TIMEOUT_SEC = 60.0
RESYNC_TIMEOUT_SEC = 30.0


# -- process B ---------------------------------------------------------------------------


def quiet() -> None:
    # Every trial kills a listener on purpose; the bus's warnings would drown the table.
    logging.getLogger("bulwark.bus").setLevel(logging.ERROR)


def subscriber_main(
    dsn: str, prefix: str, pipe: Connection, heartbeat: tuple[float, float]
) -> None:
    quiet()
    asyncio.run(_subscriber(dsn, prefix, pipe, heartbeat))


async def _subscriber(
    dsn: str, prefix: str, pipe: Connection, heartbeat: tuple[float, float]
) -> None:
    loop = asyncio.get_running_loop()
    view = View()
    applied: list[tuple[str, int, float]] = []
    target: dict[str, Any] = {}
    progress = asyncio.Event()

    def on_row(row: StateRow) -> None:
        now = time.time()
        if not row.provider.startswith(prefix):
            return
        applied.append((row.provider, row.seq, now))
        wanted = target.get("row")
        if wanted == (row.provider, row.seq) or (
            wanted is not None and wanted[0] == row.provider and row.seq >= wanted[1]
        ):
            target["at"] = now
        progress.set()

    view.subscribe(on_row)
    bus = Bus(
        dsn, view, name="bench-b", heartbeat_sec=heartbeat[0], heartbeat_timeout_sec=heartbeat[1]
    )
    await bus.start()

    async def recv() -> Any:
        return await loop.run_in_executor(None, pipe.recv)

    async def until(predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = loop.time() + timeout
        while not predicate():
            progress.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                async with asyncio.timeout(min(left, 0.05)):
                    await progress.wait()
            except TimeoutError:
                pass
        return True

    def received(count: int) -> bool:
        return len(applied) >= count

    await until(lambda: bus.connected, RESYNC_TIMEOUT_SEC)
    applied.clear()
    pipe.send(("ready", bus.listener_pid))
    while True:
        msg = await recv()
        if msg[0] == "collect":
            count: int = msg[1]
            await until(functools.partial(received, count), COLLECT_TIMEOUT_SEC)
            pipe.send(("applied", list(applied)))
            applied.clear()
        elif msg[0] == "pid":
            await until(lambda: bus.connected, RESYNC_TIMEOUT_SEC)
            pipe.send(("pid", bus.listener_pid))
        elif msg[0] == "await":
            target.clear()
            target["row"] = (msg[1], msg[2])
            pipe.send(("armed",))
            ok = await until(lambda: "at" in target, RESYNC_TIMEOUT_SEC)
            pipe.send(("synced", target.get("at") if ok else None))
            applied.clear()
        elif msg[0] == "stats":
            pipe.send(
                (
                    "stats",
                    {
                        "applied": bus.applied,
                        "stale": bus.stale,
                        "gaps": bus.gaps,
                        "reloads": bus.reloads,
                        "reconnects": bus.reconnects,
                        "heartbeat_failures": bus.heartbeat_failures,
                    },
                )
            )
        else:
            break
    await bus.close()


# -- process A ---------------------------------------------------------------------------


class Peer:
    """The parent's end of the pipe to B, without blocking the event loop."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe

    async def ask(self, *msg: Any) -> Any:
        self.pipe.send(msg)
        return await self.recv()

    async def recv(self) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.pipe.recv)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def propagation(
    bus: Bus, peer: Peer, prefix: str, count: int, rate: float | None
) -> dict[str, Any]:
    sent: dict[tuple[str, int], float] = {}
    failures = 0
    start = time.time()
    for i in range(count):
        if rate:
            delay = start + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        provider = f"{prefix}{(i // 2) % PROVIDERS}"
        flip = (i // (2 * PROVIDERS)) % 2 == 0
        t = time.time()
        if i % 2 == 0:
            row = await bus.publish(
                provider,
                breaker="open" if flip else "closed",
                reason="bench",
                source="bench-a",
                open_for=30.0 if flip else None,
            )
        else:
            row = await bus.publish(
                provider,
                health="degraded" if flip else "healthy",
                reason="bench",
                source="bench-a",
            )
        if row is None:
            failures += 1
            continue
        sent[(row.provider, row.seq)] = t
    elapsed = time.time() - start
    _, applied = await peer.ask("collect", len(sent))
    latencies = [
        (at - sent[(provider, seq)]) * 1000
        for provider, seq, at in applied
        if (provider, seq) in sent
    ]
    last = max((at for _, _, at in applied), default=start)
    return {
        "n": count,
        "delivered": len(latencies),
        "failed": failures,
        "latencies": latencies,
        "publish_rate": count / elapsed,
        "delivery_rate": len(latencies) / (last - start) if last > start else 0.0,
    }


async def resync(
    admin: asyncpg.Connection,
    peer: Peer,
    prefix: str,
    trials: int,
    *,
    freeze: bool,
    heartbeat_sec: float,
) -> list[float]:
    times: list[float] = []
    provider = f"{prefix}0"
    for _ in range(trials):
        _, pid = await peer.ask("pid")
        # B beats right after each reconnect; without a random phase every freeze would
        # land just after a beat, and we would measure only the worst case.
        await asyncio.sleep(random.uniform(0, heartbeat_sec))
        # A change B can only learn from a reload: no notification is sent for it.
        seq = await admin.fetchval(
            "UPDATE provider_state SET seq = seq + 1, reason = 'resync'"
            " WHERE provider = $1 RETURNING seq",
            provider,
        )
        await peer.ask("await", provider, seq)
        t0 = time.time()
        if freeze:
            os.kill(pid, signal.SIGSTOP)
        else:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        _, at = await peer.recv()
        if freeze:
            os.kill(pid, signal.SIGCONT)  # it finds its socket closed and exits
        if at is not None:
            times.append((at - t0) * 1000)
    return times


def row(label: str, n: int, values: Sequence[float], extra: str = "") -> str:
    if not values:
        return f"{label:<40} {n:>5}  (no samples)"
    return (
        f"{label:<40} {n:>5} {pct(values, 50):>8.1f} {pct(values, 90):>8.1f} "
        f"{pct(values, 99):>8.1f} {max(values):>8.1f}  {extra}"
    )


async def run(dsn: str, args: argparse.Namespace, embedded: bool) -> None:
    await migrate(dsn)
    prefix = f"bench{os.getpid()}-"
    admin = await asyncpg.connect(dsn)
    version = await admin.fetchval("SHOW server_version")
    heartbeat = (args.heartbeat_sec, args.heartbeat_timeout_sec)
    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(
        target=subscriber_main, args=(dsn, prefix, child_end, heartbeat), daemon=True
    )
    child.start()
    peer = Peer(parent_end)
    bus = Bus(dsn, View(), name="bench-a")
    try:
        await bus.start()
        await peer.recv()  # ("ready", pid)
        burst = await propagation(bus, peer, prefix, args.count, None)
        paced = await propagation(bus, peer, prefix, args.count, args.rate)
        killed = await resync(
            admin, peer, prefix, args.resyncs, freeze=False, heartbeat_sec=args.heartbeat_sec
        )
        frozen = (
            await resync(
                admin, peer, prefix, args.freezes, freeze=True, heartbeat_sec=args.heartbeat_sec
            )
            if embedded and args.freezes
            else []
        )
        _, stats = await peer.ask("stats")
        peer.pipe.send(("stop",))
    finally:
        await bus.close()
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
        await admin.execute("DELETE FROM provider_state WHERE provider LIKE $1", prefix + "%")
        await admin.execute("DELETE FROM breaker_events WHERE provider LIKE $1", prefix + "%")
        await admin.close()

    where = "embedded, fsync off" if embedded else "DATABASE_URL"
    python = sys.version.split()[0]
    print(f"state bus: PostgreSQL {version} ({where}), {os.cpu_count()} CPUs, Python {python}")
    print(f"{'phase':<40} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, result in (
        ("propagation, burst", burst),
        (f"propagation, paced {args.rate:g}/s", paced),
    ):
        extra = (
            f"publish {result['publish_rate']:.0f}/s, delivered {result['delivered']}/{result['n']}"
            + (f", {result['failed']} publish failed" if result["failed"] else "")
        )
        print(row(label, result["n"], result["latencies"], extra))
    print(row("resync after pg_terminate_backend", args.resyncs, killed, f"{len(killed)} synced"))
    if frozen or (embedded and args.freezes):
        print(
            row(
                f"resync after SIGSTOP (heartbeat {heartbeat[0]:g}+{heartbeat[1]:g}s)",
                args.freezes,
                frozen,
                f"{len(frozen)} synced",
            )
        )
    print("subscriber counters: " + ", ".join(f"{k} {v}" for k, v in stats.items()))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ops.bench_bus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=1000, help="changes per propagation phase")
    parser.add_argument("--rate", type=float, default=500.0, help="paced phase, changes per second")
    parser.add_argument("--resyncs", type=int, default=10, help="pg_terminate_backend trials")
    parser.add_argument("--freezes", type=int, default=10, help="SIGSTOP trials (embedded only)")
    parser.add_argument("--heartbeat-sec", type=float, default=0.5, help="B's heartbeat period")
    parser.add_argument(
        "--heartbeat-timeout-sec", type=float, default=1.0, help="B's heartbeat timeout"
    )
    args = parser.parse_args(argv)
    quiet()
    dsn = os.environ.get("DATABASE_URL")
    if dsn:
        asyncio.run(run(dsn, args, embedded=False))
        return
    data_dir = Path(tempfile.mkdtemp(prefix="bulwark-bench-pg-"))
    cluster = EmbeddedPostgres(data_dir, throwaway=True)
    try:
        asyncio.run(run(cluster.start(), args, embedded=True))
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
