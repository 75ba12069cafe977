"""Client keys, fleet-wide rate limits and bulkheads under load, each against a baseline
measured in the same run:

    .venv/bin/python -m ops.bench_keys              # all three parts, ~2 minutes
    .venv/bin/python -m ops.bench_keys --part cpu   # or: overshoot, flood

1. `cpu`: CPU per request of a gateway whose database holds a client key (every request
   authenticated and rate limited: RPM and TPM, both far above the load) against the same
   gateway on a database with no key (authentication off), alternating, `--rounds` times;
   the canned upstream (`ops/bench_upstream.py`), wrk with the key as bearer token.
2. `overshoot`: four web processes on one port (SO_REUSEPORT) and a fresh key at
   `--rpm`; wrk hammers the port for `--seconds` from 32 connections. What the bucket
   allows is `rpm + rpm/60 * seconds`; the overshoot is what was admitted beyond it.
3. `flood`: one web process, a simulator answering after 2 s, and 2,000 concurrent
   connections (wrk) for 15 s: `/health/live` latency (a fresh connection each probe,
   every 50 ms) against the same probe while idle, the process's peak RSS, and how the
   flood was answered (the bulkhead refuses beyond BULWARK_MAX_IN_FLIGHT with 503).

Processes are spawned as in `ops/bench_chat.py` (whose helpers this reuses); Postgres is
a throwaway embedded cluster. Only loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from bulwark import clientkeys
from bulwark.pgembed import EmbeddedPostgres
from ops.bench_chat import Proc, cpu_ns, free_port, spawn, status_kib, stop, tail, wait_ready
from schema.migrate import migrate

BODY = json.dumps({"model": "default", "max_tokens": 64, "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello in twenty words."}]}, separators=(",", ":"))

LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  io.write(string.format('BENCH_JSON {{"requests":%d,"duration_us":%d,"p50_us":%d,'
    .. '"p99_us":%d,"non2xx":%d,"err_connect":%d,"err_read":%d,"err_timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.timeout))
end
"""


def lua(dirpath: Path, name: str, key: str | None) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    path = dirpath / f"{name}.lua"
    path.write_text(LUA.format(body=json.dumps(BODY), auth=auth))
    return path


def wrk(port: int, script: Path, *, conns: int, seconds: int, threads: int = 1) -> dict[str, int]:
    argv = [shutil.which("wrk") or "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s",
            "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}/v1/chat/completions"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, int] = json.loads(line[len("BENCH_JSON "):])
            return result
    raise RuntimeError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")


class Rig:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []
        self.pg: EmbeddedPostgres | None = None
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("BULWARK_", "DATABASE_URL", "PORT", "HTTP_", "CB_",
                                         "HEALTHD_", "OTEL_"))}
        self.env.update(PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING", HOST="127.0.0.1")

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        proc = spawn(name, argv, env=env, cpus=None, logs=self.logs)
        self.procs.append(proc)
        return proc

    def database(self, name: str) -> str:
        if self.pg is None:
            self.pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bench_keys-pg.")),
                                       throwaway=True)
            self.pg.start()
        dsn = self.pg.dsn

        async def make() -> str:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            target = dsn.rsplit("/", 1)[0] + "/" + name
            await migrate(target)
            return target

        return asyncio.run(make())

    def upstream(self, module: str = "ops.bench_upstream") -> int:
        port = free_port()
        up = self.start("upstream", [sys.executable, "-m", module, "--port", str(port)],
                        self.env)
        wait_ready(up, port, "/health")
        providers = self.logs / f"providers-{port}.toml"
        providers.write_text(
            '[[providers]]\nname = "bench"\nkind = "openai"\nhealth_check = "chat"\n'
            f'base_url = "http://127.0.0.1:{port}/v1"\n[providers.models]\n'
            'default = "sim-1"\n')
        self.providers = providers
        return port

    def web(self, name: str, port: int, dsn: str | None, **extra: str) -> Proc:
        env = dict(self.env, BULWARK_PROVIDERS=str(self.providers), BULWARK_PORT=str(port),
                   **extra)
        if dsn:
            env["DATABASE_URL"] = dsn
        # BENCH_KEYS_GATEWAY=ops.bench_profile runs the gateways under the profiler.
        module = os.environ.get("BENCH_KEYS_GATEWAY", "service")
        proc = self.start(name, [sys.executable, "-m", module], env)
        wait_ready(proc, port, "/health/live")
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        if self.pg is not None:
            self.pg.stop()


def new_key(dsn: str, name: str, *, rpm: int | None = None, tpm: int | None = None) -> str:
    async def create() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            new = clientkeys.NewKey(name=name, rpm=rpm, tpm=tpm)
            _, key = await clientkeys.create(conn, new, actor="bench", address="bench",
                                             source="bench")
            return key
        finally:
            await conn.close()
    return asyncio.run(create())


def until_ok(port: int, key: str | None) -> None:
    """Until the process has the key (a 200 with it), at most 15 s."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
            if conn.getresponse().status == 200:
                return
        conn.close()
        time.sleep(0.05)
    raise RuntimeError("the gateway never accepted the key")


def part_cpu(rig: Rig, rounds: int, seconds: int) -> None:
    rig.upstream()
    off_db, on_db = rig.database("keys_off"), rig.database("keys_on")
    key = new_key(on_db, "bench", rpm=1_000_000_000, tpm=1_000_000_000)
    off_port, on_port = free_port(), free_port()
    prof = os.environ.get("BENCH_PROFILE_OUT", "/tmp/bench_keys-profile")
    off = rig.web("gateway-off", off_port, off_db, BENCH_PROFILE_OUT=prof + "-off")
    on = rig.web("gateway-on", on_port, on_db, BENCH_PROFILE_OUT=prof + "-on")
    until_ok(off_port, None)
    until_ok(on_port, key)
    scripts = {"off": lua(rig.logs, "off", key), "on": lua(rig.logs, "on", key)}
    per_req: dict[str, list[float]] = {"off": [], "on": []}
    rps: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for label, proc, port in (("off", off, off_port), ("on", on, on_port)):
            before = cpu_ns(proc.pid)
            result = wrk(port, scripts[label], conns=16, seconds=seconds)
            used = cpu_ns(proc.pid) - before
            if result["non2xx"] or result["err_connect"] or result["err_timeout"]:
                raise RuntimeError(f"{label}: errors in the run: {result}\n{tail(proc.log)}")
            per_req[label].append(used / 1000 / result["requests"])
            rps[label].append(result["requests"] / (result["duration_us"] / 1e6))
    med = {k: statistics.median(v) for k, v in per_req.items()}
    print("## cpu: key auth + rate limiting on against off (json, 16 connections)")
    print(f"rounds {rounds} x {seconds} s; CPU µs/request: off {med['off']:.1f} "
          f"(runs {', '.join(f'{x:.1f}' for x in per_req['off'])}), on {med['on']:.1f} "
          f"(runs {', '.join(f'{x:.1f}' for x in per_req['on'])})")
    print(f"req/s: off {statistics.median(rps['off']):.0f}, on {statistics.median(rps['on']):.0f}")
    print(f"ratio on/off: {med['on'] / med['off']:.3f}  (target <= 1.10)")
    # Rounds alternate off, on: the ratio within each pair cancels slow drifts of the
    # machine's load (other work on a shared box), which the medians above do not.
    pairs = [on_ / off_ for off_, on_ in zip(per_req["off"], per_req["on"], strict=True)]
    print(f"paired ratio on/off: median {statistics.median(pairs):.3f} "
          f"(rounds {', '.join(f'{x:.2f}' for x in pairs)})")


def part_overshoot(rig: Rig, rpm: int, seconds: int, runs: int) -> None:
    rig.upstream()
    dsn = rig.database("overshoot")
    port = free_port()
    for i in range(4):
        rig.web(f"web{i}", port, dsn)
    # Warm all four: a keyless request while no key exists yet.
    until_ok(port, None)
    print(f"## overshoot: 4 web processes on one port, key at {rpm} RPM, wrk 32 connections")
    for run in range(runs):
        key = new_key(dsn, f"overshoot-{run}", rpm=rpm)
        time.sleep(0.5)  # the record reaches all four (NOTIFY: milliseconds)
        result = wrk(port, lua(rig.logs, f"over{run}", key), conns=32, seconds=seconds,
                     threads=2)
        admitted = result["requests"] - result["non2xx"]
        duration = result["duration_us"] / 1e6
        allowed = rpm + rpm / 60 * duration
        print(f"run {run + 1}: {result['requests']} requests in {duration:.2f} s, "
              f"{admitted} admitted; the bucket allows {allowed:.1f}: overshoot "
              f"{admitted - allowed:+.1f} ({(admitted - allowed) / allowed * 100:+.2f}%)")


def probe_livez(port: int, stop_at: float, out: list[float], every: float = 0.05) -> None:
    while time.monotonic() < stop_at:
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/health/live")
            ok = conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            conn.close()
        out.append((time.monotonic() - t0) * 1000 if ok else float("inf"))
        time.sleep(every)


def part_flood(rig: Rig, conns: int, seconds: int) -> None:
    up_port = rig.upstream("ops.sim")
    script = json.dumps({"then": {"latency_ms": 2000}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", up_port, timeout=5)
    conn.request("POST", "/_sim/script", body=script,
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    port, hport = free_port(), free_port()
    # The health port (service/liveness.py): /health/live answered by a thread of its own.
    web = rig.web("flood-web", port, None, BULWARK_HEALTH_PORT=str(hport))
    idle: list[float] = []
    probe_livez(port, time.monotonic() + 2, idle)
    rss_idle = status_kib(web.pid, "VmRSS")
    under: list[float] = []
    under_hport: list[float] = []
    peak = [0]

    def sample_rss() -> None:
        while time.monotonic() < end:
            peak[0] = max(peak[0], status_kib(web.pid, "VmRSS"))
            time.sleep(0.1)

    end = time.monotonic() + seconds + 1
    threads = [threading.Thread(target=probe_livez, args=(port, end, under)),
               threading.Thread(target=probe_livez, args=(hport, end, under_hport)),
               threading.Thread(target=sample_rss)]
    for t in threads:
        t.start()
    result = wrk(port, lua(rig.logs, "flood", None), conns=conns, seconds=seconds, threads=2)
    for t in threads:
        t.join()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    failed = sum(1 for v in under if v == float("inf"))
    ok = [v for v in under if v != float("inf")]
    h_failed = sum(1 for v in under_hport if v == float("inf"))
    h_ok = [v for v in under_hport if v != float("inf")]
    print(f"## flood: {conns} connections for {seconds} s, upstream answering after 2 s")
    print(f"wrk: {result['requests']} responses, {result['non2xx']} non-2xx (503 "
          f"server_overloaded), connect errors {result['err_connect']}, read errors "
          f"{result['err_read']}, timeouts {result['err_timeout']}")
    print(f"/health/live idle: p50 {pct(idle, 0.5):.2f} ms, p99 {pct(idle, 0.99):.2f} ms "
          f"({len(idle)} probes)")
    if ok:
        print(f"/health/live under the flood, API port: p50 {pct(ok, 0.5):.2f} ms, p99 "
              f"{pct(ok, 0.99):.2f} ms, max {max(ok):.2f} ms ({len(under)} probes, "
              f"{failed} failed)")
    if h_ok:
        print(f"/health/live under the flood, health port: p50 {pct(h_ok, 0.5):.2f} ms, p99 "
              f"{pct(h_ok, 0.99):.2f} ms, max {max(h_ok):.2f} ms ({len(under_hport)} probes, "
              f"{h_failed} failed)")
    print(f"RSS: idle {rss_idle / 1024:.1f} MiB, peak under the flood {peak[0] / 1024:.1f} MiB,"
          f" VmHWM {status_kib(web.pid, 'VmHWM') / 1024:.1f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_keys")
    parser.add_argument("--part", choices=["all", "cpu", "overshoot", "flood"], default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="per cpu round")
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--over-seconds", type=int, default=10)
    parser.add_argument("--over-runs", type=int, default=2)
    parser.add_argument("--flood-conns", type=int, default=2000)
    parser.add_argument("--flood-seconds", type=int, default=15)
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is required (apt-get install wrk)", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix="bench_keys."))
    print(f"logs in {logs}; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
    parts = ["cpu", "overshoot", "flood"] if args.part == "all" else [args.part]
    for part in parts:
        rig = Rig(logs)
        try:
            if part == "cpu":
                part_cpu(rig, args.rounds, args.seconds)
            elif part == "overshoot":
                part_overshoot(rig, args.rpm, args.over_seconds, args.over_runs)
            else:
                part_flood(rig, args.flood_conns, args.flood_seconds)
        finally:
            rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
