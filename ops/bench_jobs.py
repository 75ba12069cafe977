"""Durable jobs, the DLQ replay and Idempotency-Key, measured on this machine in one run.

    .venv/bin/python -m ops.bench_jobs                 # ~2 minutes
    .venv/bin/python -m ops.bench_jobs --quick         # smoke check, ~50 s

Processes: a throwaway embedded PostgreSQL with fsync ON (a 202 waits for a durable
commit, as in production), the simulator (`python -m ops.sim`), one web process
(`python -m service`, DATABASE_URL set, jobs concurrency 4) and, for the DLQ phase,
healthd. The load comes from this process (aiohttp, closed loop).

Phases:
1. Idempotency-Key: non-streaming chat at concurrency 8, alternating rounds without a key
   (today's path) and with a unique key per request (one claim round trip before the
   upstream call, the stored answer written after). Reports the web process's CPU per
   request (on-CPU ns of all its threads / requests) and Postgres's, as ratios to the
   no-key rounds of the same run, medians over the rounds.
2. Jobs: POST /v1/chat/jobs at concurrency 16 for a while: accepted per second (each 202
   after its commit); the worker runs them meanwhile; completed per second = succeeded
   jobs / time from the first POST until the queue is empty.
3. DLQ: 1,000 dead jobs inserted directly, then healthd started with
   BULWARK_DLQ_REPLAY_PER_SEC=--pace: its first term sees the provider healthy (a
   recovery), and replays them. Time to drain (healthd start → last job succeeded) and
   the upstream's chat requests per second, max over any 1-second window, from the
   simulator's log — which must never exceed the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bulwark.pgembed import EmbeddedPostgres
from ops.bench_chat import Proc, cpu_ns, free_port, spawn, stop, wait_ready
from schema.migrate import migrate

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 32}


def postgres_cpu_ns(cluster: EmbeddedPostgres) -> int:
    """On-CPU ns of the postmaster and every backend (its children)."""
    root = cluster._running_pid()  # an ops tool reading its own cluster
    if root is None:
        return 0
    pids = [root]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == root:
                pids.append(int(entry.name))
    total = 0
    for pid in pids:
        try:
            total += cpu_ns(pid)
        except OSError:
            continue
    return total


async def closed_loop(url: str, body: dict[str, Any], *, concurrency: int, seconds: float,
                      keyed: bool, expect: int) -> tuple[int, int]:
    """(ok, other) responses of `concurrency` clients posting back to back."""
    ok = other = 0
    stop_at = time.monotonic() + seconds
    payload = json.dumps(body).encode()
    counter = 0

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal ok, other, counter
        while time.monotonic() < stop_at:
            headers = {"Content-Type": "application/json"}
            if keyed:
                counter += 1
                headers["Idempotency-Key"] = f"bench-{os.getpid()}-{n}-{counter}"
            async with session.post(url, data=payload, headers=headers) as resp:
                await resp.read()
                if resp.status == expect:
                    ok += 1
                else:
                    other += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    return ok, other


class Rig:
    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.procs: list[Proc] = []
        self.data = Path(tempfile.mkdtemp(prefix="bulwark-bench-jobs-pg-"))
        self.pg = EmbeddedPostgres(self.data)  # fsync on: the commits are real
        self.dsn = ""
        self.sim_port = free_port()
        self.web_port = free_port()
        self.providers = logs / "providers.toml"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BULWARK_", "DATABASE_URL", "PORT"))}
        env.update({"DATABASE_URL": self.dsn, "BULWARK_PROVIDERS": str(self.providers),
                    "LOG_LEVEL": "WARNING", "HEALTHD_INTERVAL_SEC": "1", **extra})
        return env

    async def start(self) -> None:
        self.dsn = await asyncio.to_thread(self.pg.start)
        await migrate(self.dsn)
        self.providers.write_text(
            f'[[providers]]\nname = "bench"\nkind = "openai"\n'
            f'base_url = "http://127.0.0.1:{self.sim_port}/v1"\n'
            f'[providers.models]\ndefault = "sim-1"\n')
        sim = spawn("sim", [sys.executable, "-m", "ops.sim", "--port", str(self.sim_port),
                            "--name", "bench"], env=self.env(), cpus=None, logs=self.logs)
        self.procs.append(sim)
        await asyncio.to_thread(wait_ready, sim, self.sim_port, "/health")
        self.web = spawn("web", [sys.executable, "-m", "service"],
                         env=self.env(BULWARK_PORT=str(self.web_port)), cpus=None,
                         logs=self.logs)
        self.procs.append(self.web)
        await asyncio.to_thread(wait_ready, self.web, self.web_port, "/health/live")

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        self.pg.stop()
        shutil.rmtree(self.data, ignore_errors=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    async def sim_log(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.sim_port}/_sim/log") as resp:
            data: list[dict[str, Any]] = await resp.json()
            return data

    async def sim_reset(self) -> None:
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{self.sim_port}/_sim/reset") as resp:
            await resp.read()


async def idempotency_phase(rig: Rig, rounds: int, seconds: float) -> dict[str, float]:
    url = f"{rig.base}/v1/chat/completions"
    await closed_loop(url, CHAT, concurrency=8, seconds=2, keyed=True, expect=200)  # warm
    per: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for keyed in (False, True):
            web0, pg0 = cpu_ns(rig.web.pid), postgres_cpu_ns(rig.pg)
            ok, other = await closed_loop(url, CHAT, concurrency=8, seconds=seconds,
                                          keyed=keyed, expect=200)
            web1, pg1 = cpu_ns(rig.web.pid), postgres_cpu_ns(rig.pg)
            if other:
                raise RuntimeError(f"{other} requests failed (keyed={keyed})")
            per[keyed].append(((web1 - web0) / ok / 1000, (pg1 - pg0) / ok / 1000))
            print(f"  {'key   ' if keyed else 'no key'}: {ok / seconds:7.0f} req/s, "
                  f"web {per[keyed][-1][0]:6.0f} µs/req, postgres {per[keyed][-1][1]:6.0f} "
                  "µs/req", flush=True)
    base_web = statistics.median(w for w, _ in per[False])
    key_web = statistics.median(w for w, _ in per[True])
    base_pg = statistics.median(p for _, p in per[False])
    key_pg = statistics.median(p for _, p in per[True])
    return {"web_us_no_key": base_web, "web_us_key": key_web, "web_ratio": key_web / base_web,
            "pg_us_no_key": base_pg, "pg_us_key": key_pg,
            "total_ratio": (key_web + key_pg) / (base_web + base_pg)}


async def queue_empty(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(
        "select count(*) = 0 from chat_jobs where status in ('queued', 'running')"))


async def jobs_phase(rig: Rig, seconds: float) -> dict[str, float]:
    conn = await asyncpg.connect(rig.dsn)
    try:
        await conn.execute("truncate chat_jobs")
        started = time.monotonic()
        ok, other = await closed_loop(f"{rig.base}/v1/chat/jobs", {"request": CHAT},
                                      concurrency=16, seconds=seconds, keyed=False, expect=202)
        accept_s = time.monotonic() - started
        if other:
            raise RuntimeError(f"{other} job submissions failed")
        done_during = await conn.fetchval(
            "select count(*) from chat_jobs where status = 'succeeded'")
        while not await queue_empty(conn):
            await asyncio.sleep(0.05)
        total_s = time.monotonic() - started
        succeeded = await conn.fetchval(
            "select count(*) from chat_jobs where status = 'succeeded'")
    finally:
        await conn.close()
    if succeeded != ok:
        raise RuntimeError(f"{ok} accepted but {succeeded} succeeded")
    return {"accepted": ok, "accepted_per_s": ok / accept_s,
            "completed_during_accept": done_during, "completed_per_s": ok / total_s,
            "drain_s": total_s}


async def dlq_phase(rig: Rig, count: int, pace: float) -> dict[str, float]:
    conn = await asyncpg.connect(rig.dsn)
    try:
        await conn.execute("truncate chat_jobs")
        request = json.dumps(CHAT)
        await conn.execute(
            "insert into chat_jobs (id, status, model, request, attempts, dead_at, finished_at,"
            " error) select 'job_' || lpad(to_hex(g), 24, '0'), 'dead', 'default', $1::jsonb,"
            " 8, now() - interval '1 second', now() - interval '1 second',"
            " '{\"code\": \"no_provider_available\"}'::jsonb"
            " from generate_series(1, $2) g", request, count)
        await rig.sim_reset()
        started = time.monotonic()
        healthd = spawn("healthd", [sys.executable, "-m", "healthd"],
                        env=rig.env(BULWARK_DLQ_REPLAY_PER_SEC=str(pace)), cpus=None,
                        logs=rig.logs)
        rig.procs.append(healthd)
        while await conn.fetchval(
                "select count(*) from chat_jobs where status = 'succeeded'") < count:
            if time.monotonic() - started > count / pace * 3 + 60:
                raise RuntimeError("DLQ not drained in time")
            await asyncio.sleep(0.1)
        drain_s = time.monotonic() - started
        replays = await conn.fetchval("select max(replays) from chat_jobs")
    finally:
        await conn.close()
    times = sorted(e["t"] for e in await rig.sim_log() if e["path"] == "/v1/chat/completions")
    busiest = max(sum(1 for t in times[i:i + int(pace) * 3] if t < start + 1.0)
                  for i, start in enumerate(times))
    return {"jobs": count, "pace": pace, "drain_s": drain_s,
            "replay_span_s": times[-1] - times[0], "upstream_requests": len(times),
            "max_per_1s_window": busiest,
            "mean_per_s": (len(times) - 1) / max(times[-1] - times[0], 1e-9),
            "max_replays_per_job": replays}


async def run(args: argparse.Namespace) -> int:
    logs = Path(tempfile.mkdtemp(prefix="bulwark-bench-jobs-"))
    rig = Rig(args, logs)
    try:
        await rig.start()
        print(f"machine: {os.cpu_count()} CPUs; logs in {logs}", flush=True)
        print("1. Idempotency-Key (non-streaming chat, concurrency 8)", flush=True)
        idem = await idempotency_phase(rig, args.rounds, args.seconds)
        print(f"   web CPU/request with a key: {idem['web_ratio']:.2f}x today's path "
              f"({idem['web_us_key']:.0f} vs {idem['web_us_no_key']:.0f} µs); web+postgres "
              f"{idem['total_ratio']:.2f}x (postgres {idem['pg_us_key']:.0f} vs "
              f"{idem['pg_us_no_key']:.0f} µs)", flush=True)
        print("2. Jobs (POST /v1/chat/jobs, concurrency 16)", flush=True)
        jobs = await jobs_phase(rig, args.seconds * 2)
        print(f"   accepted {jobs['accepted']} at {jobs['accepted_per_s']:.0f}/s (202 after a "
              f"durable commit); completed {jobs['completed_per_s']:.0f}/s "
              f"(queue empty after {jobs['drain_s']:.1f} s)", flush=True)
        print(f"3. DLQ replay of {args.dead} dead jobs at {args.pace:g}/s", flush=True)
        dlq = await dlq_phase(rig, args.dead, args.pace)
        print(f"   drained in {dlq['drain_s']:.1f} s from healthd's start (replays spanned "
              f"{dlq['replay_span_s']:.1f} s); upstream {dlq['upstream_requests']} requests, "
              f"max {dlq['max_per_1s_window']} in any 1 s window (pace {args.pace:g}), "
              f"mean {dlq['mean_per_s']:.1f}/s; each job replayed "
              f"{dlq['max_replays_per_job']} time(s)", flush=True)
        ok = dlq["max_per_1s_window"] <= args.pace
        print(json.dumps({"idempotency": idem, "jobs": jobs, "dlq": dlq}), flush=True)
        return 0 if ok else 1
    finally:
        rig.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_jobs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--dead", type=int, default=1000)
    parser.add_argument("--pace", type=float, default=50.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.dead, args.pace = 1, 2.0, 200, 50.0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
