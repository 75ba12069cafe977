"""What CORS costs on the chat path, and what a feedback round trip to Postgres takes.

    .venv/bin/python -m ops.bench_edge              # ~1 minute
    .venv/bin/python -m ops.bench_edge --quick      # smoke check, ~20 s

Processes: the canned upstream (`ops/bench_upstream.py`), two gateways (`python -m
service`, no database) — `plain` (BULWARK_CORS_ORIGINS unset) and `cors` (set) — and a
third, `feedback`, on a throwaway embedded PostgreSQL (fsync off), migrated. wrk is the load.

1. CORS: non-streaming chat at c=32 against `plain`, `cors` without an Origin header (an
   SDK client), and `cors` with an allowed Origin (a browser), interleaved over rounds
   (reverse order every other round); CPU µs per request of the gateway process (from
   /proc/<pid>/task/*/schedstat over the load window) and p50/p99. Ratios are against
   `plain` in the same run.
2. Feedback: `POST /v1/feedback` at c=1 and c=16 against the `feedback` gateway, beside
   `GET /health/live` on the same process (no database involved): req/s, p50, p99. The
   difference is the INSERT round trip through the bus's write pool.
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
from pathlib import Path

from bulwark.pgembed import EmbeddedPostgres
from ops.bench_chat import (
    Proc,
    chat_body,
    cpu_ns,
    free_port,
    http_post,
    spawn,
    stop,
    tail,
    wait_ready,
)
from schema.migrate import migrate

ORIGIN = "https://chat.example.com"

_LUA = """\
wrk.method = "{method}"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{extra}
done = function(summary, latency, requests)
  io.write(string.format('BENCH_JSON {{"requests":%d,"duration_us":%d,"p50_us":%d,'
    .. '"p99_us":%d,"errors":%d}}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout))
end
"""


def lua(path: Path, *, method: str = "POST", body: bytes = b"", origin: str | None = None) -> Path:
    extra = f'wrk.headers["Origin"] = "{origin}"' if origin else ""
    path.write_text(_LUA.format(method=method, body=json.dumps(body.decode()) if body else "nil",
                                extra=extra))
    return path


def wrk(port: int, path: str, script: Path, concurrency: int, seconds: int,
        pid: int) -> dict[str, float]:
    import subprocess

    before = cpu_ns(pid)
    done = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s", "-s",
         str(script), f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=seconds + 30, check=False)
    used_ns = cpu_ns(pid) - before
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            out: dict[str, float] = json.loads(line[len("BENCH_JSON "):])
            out["cpu_us_per_req"] = used_ns / 1000 / max(1, out["requests"])
            out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
            return out
    raise RuntimeError(f"wrk gave no result:\n{done.stdout}\n{done.stderr}")


def check_answers(port: int) -> None:
    status, headers, _ = http_post(port, chat_body("json"))
    if status != 200 or headers.get("x-bulwark-provider") != "bench":
        raise RuntimeError(f"gateway answered {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_edge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 1, 1
    if not shutil.which("wrk"):
        print("bench_edge: wrk not found", file=sys.stderr)
        return 2
    py = sys.executable
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BULWARK_", "OTEL_", "DATABASE_URL", "PORT", "HTTP_"))}
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="bench_edge.") as tmp:
        logs = Path(tmp)
        pg_dir = Path(tempfile.mkdtemp(prefix="bench_edge-pg."))
        cluster = EmbeddedPostgres(pg_dir, throwaway=True)
        try:
            up_port = free_port()
            procs.append(up := spawn("upstream", [py, "-m", "ops.bench_upstream", "--port",
                                                  str(up_port)], env=env, cpus=None, logs=logs))
            wait_ready(up, up_port, "/health")
            providers = logs / "providers.toml"
            providers.write_text(
                '[[providers]]\nname = "bench"\nkind = "openai"\n'
                f'base_url = "http://127.0.0.1:{up_port}/v1"\n'
                '[providers.models]\ndefault = "sim-1"\n')
            gw_env = dict(env, BULWARK_PROVIDERS=str(providers), LOG_LEVEL="WARNING")
            dsn = cluster.start()
            asyncio.run(migrate(dsn))
            ports: dict[str, int] = {}
            pids: dict[str, int] = {}
            for name, extra in (("plain", {}), ("cors", {"BULWARK_CORS_ORIGINS": ORIGIN}),
                                ("feedback", {"DATABASE_URL": dsn})):
                ports[name] = free_port()
                proc = spawn(name, [py, "-m", "service"], env=dict(
                    gw_env, BULWARK_PORT=str(ports[name]), **extra), cpus=None, logs=logs)
                procs.append(proc)
                wait_ready(proc, ports[name], "/health/live")
                pids[name] = proc.pid
            check_answers(ports["plain"])

            chat = lua(logs / "chat.lua", body=chat_body("json"))
            chat_origin = lua(logs / "chat-origin.lua", body=chat_body("json"), origin=ORIGIN)
            cells = [("plain", chat), ("cors, no Origin", chat), ("cors, Origin", chat_origin)]
            runs: dict[str, list[dict[str, float]]] = {c: [] for c, _ in cells}
            for r in range(args.rounds):
                for label, script in (cells if r % 2 == 0 else cells[::-1]):
                    target = "plain" if label == "plain" else "cors"
                    wrk(ports[target], "/v1/chat/completions", script, 32, 1, pids[target])
                    runs[label].append(wrk(ports[target], "/v1/chat/completions", script, 32,
                                           args.duration, pids[target]))
            print(f"## CORS on the chat path (json, c=32, {args.rounds} rounds × "
                  f"{args.duration} s, medians)\n")
            print("| target | req/s | CPU µs/req | × plain | p50 ms | p99 ms | errors |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            base = statistics.median(x["cpu_us_per_req"] for x in runs["plain"])
            for label, _ in cells:
                m = {k: statistics.median(x[k] for x in runs[label]) for k in runs[label][0]}
                print(f"| {label} | {m['rps']:.0f} | {m['cpu_us_per_req']:.1f} | "
                      f"{m['cpu_us_per_req'] / base:.3f} | {m['p50_us'] / 1000:.2f} | "
                      f"{m['p99_us'] / 1000:.2f} | {sum(x['errors'] for x in runs[label]):.0f} |")

            fb = lua(logs / "feedback.lua", body=json.dumps(
                {"request_id": "req_bench", "rating": 1, "tags": ["bench"]}).encode())
            live = lua(logs / "live.lua", method="GET")
            print("\n## Feedback round trip (one INSERT before the 201) beside /health/live\n")
            print("| request | c | req/s | p50 ms | p99 ms | errors |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for c in (1, 16):
                for label, path, script in (("GET /health/live", "/health/live", live),
                                            ("POST /v1/feedback", "/v1/feedback", fb)):
                    m = wrk(ports["feedback"], path, script, c, args.duration, pids["feedback"])
                    print(f"| {label} | {c} | {m['rps']:.0f} | {m['p50_us'] / 1000:.2f} | "
                          f"{m['p99_us'] / 1000:.2f} | {m['errors']:.0f} |")
        except (RuntimeError, OSError) as err:
            print(f"bench_edge: {err}", file=sys.stderr)
            for proc in procs:
                print(f"--- {proc.name} ---\n{tail(proc.log)}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):
                stop(proc)
            cluster.stop()
            shutil.rmtree(pg_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
