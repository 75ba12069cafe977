"""What the response cache costs on the success path: CPU per request of a gateway with
`cache = "fallback"` (and `"first"`) against the same gateway with `cache = "off"`, in one run.

    .venv/bin/python -m ops.bench_cache              # ~2 minutes
    .venv/bin/python -m ops.bench_cache --quick      # smoke check, ~40 s

Three web processes (`python -m service`) run at once, all with `DATABASE_URL` (a throwaway
embedded Postgres, migrated) so that the bus is live in each and the only difference is
`[models.default] cache`: `off`, `fallback` (the default) and `first`. They share the canned
upstream (`ops/bench_upstream.py`). Placement as in ops/bench_chat.py: the gateways on one
CPU (one loaded at a time), the upstream, wrk and Postgres on the other.

Two request mixes, because the cache's work depends on it:

- `same`: every request is the same body. `fallback` stores each answer in the LRU, and
  writes the key to Postgres once a minute (REWRITE_SEC); `first` answers from its LRU
  without calling the upstream at all.
- `distinct`: every request differs (a counter in the message), so every answer is a new
  key: `fallback` stores every answer in the LRU *and* writes a row for each (batched);
  `first` misses its LRU on every request and asks Postgres (a miss), then the upstream —
  this is the cost of the `first` mode's Postgres read.

Modes `json` and `stream` (the 20-chunk stream of bench_chat; stored answers are assembled
from its chunks). Per cell it reports requests/s, p50/p99 and the server's CPU µs/request
(on-CPU ns of all its threads over the window / requests), the median of `--repeat` rounds
(targets interleaved, reversed every other round), and the ratio against `off`.
Target: `fallback` ≤ 1.05× `off` on the success path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bulwark.pgembed import EmbeddedPostgres
from ops.bench_chat import (
    LUA_DONE,
    Proc,
    cpu_ns,
    free_port,
    http_get,
    http_post,
    placement,
    run_wrk,
    spawn,
    stop,
    tail,
    wait_ready,
)
from schema.migrate import migrate

TARGETS = ("off", "fallback", "first")
MIXES = ("same", "distinct")
MODES = ("json", "stream")
TARGET_RATIO = 1.05

_LUA = """\
local prefix = {prefix}
local suffix = {suffix}
local distinct = {distinct}
local nonce = {nonce}
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  n = n + 1
  local word = distinct and nonce .. "-" .. tostring(n) or "x"
  return wrk.format(nil, nil, nil, prefix .. word .. suffix)
end

""" + LUA_DONE

_MARK = "@@WORD@@"


def body(mode: str, word: str = _MARK) -> str:
    return json.dumps({
        "model": "default",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": f"Say hello in twenty words ({word})."}],
        "stream": mode == "stream", "max_tokens": 64}, separators=(",", ":"))


@dataclass
class Cell:
    target: str
    mode: str
    mix: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    errors: int
    upstream_per_req: float | None


class Bench:
    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.server_cpus, self.upstream_cpus, self.wrk_cpus = placement(args.no_pin)
        self.helper_cpus = (None if self.upstream_cpus is None
                            else self.upstream_cpus | (self.wrk_cpus or set()))
        self.cluster: EmbeddedPostgres | None = None
        self.pg_dir: Path | None = None
        self.runs: list[Cell] = []
        self.runs_started = 0
        self.wrk = shutil.which("wrk") or ""
        self.up_port = 0

    def start(self) -> None:
        py = sys.executable
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BULWARK_", "OTEL_", "DATABASE_URL", "PORT", "HTTP_",
                                    "CB_", "HEALTHD_"))}
        env["PYTHONUNBUFFERED"] = "1"
        if self.helper_cpus is not None:
            os.sched_setaffinity(0, self.helper_cpus)  # Postgres inherits it
        self.pg_dir = Path(tempfile.mkdtemp(prefix="bench_cache-pg."))
        self.cluster = EmbeddedPostgres(self.pg_dir, throwaway=True)
        dsn = self.cluster.start()
        asyncio.run(migrate(dsn))
        self.up_port = free_port()
        up = self._spawn("upstream", [py, "-m", "ops.bench_upstream", "--port",
                                      str(self.up_port)], env, self.upstream_cpus)
        wait_ready(up, self.up_port, "/health")
        base = f"http://127.0.0.1:{self.up_port}/v1"
        for target in TARGETS:
            providers = self.logs / f"providers-{target}.toml"
            providers.write_text(
                '[[providers]]\nname = "bench"\nkind = "openai"\nhealth_check = "chat"\n'
                f'base_url = "{base}"\n[providers.models]\ndefault = "sim-1"\n\n'
                f'[models.default]\ncache = "{target}"\ncache_ttl_sec = 3600\n')
            port = self.ports[target] = free_port()
            gw_env = dict(env, HOST="127.0.0.1", BULWARK_PROVIDERS=str(providers),
                          BULWARK_PORT=str(port), DATABASE_URL=dsn, HEALTHD_INTERVAL_SEC="1")
            module = "service"
            if self.args.profile:
                # ops/bench_profile.py's sampler: where each target's CPU goes, by function.
                module = "ops.bench_profile"
                self.args.profile.mkdir(parents=True, exist_ok=True)
                gw_env["BENCH_PROFILE_OUT"] = str(self.args.profile / target)
            gw = self._spawn(target, [py, "-m", module], gw_env, self.server_cpus)
            wait_ready(gw, port, "/health/live")
            self.pids[target] = gw.pid
        for target in TARGETS:
            # No healthd here: the bus synced is enough (healthd stale is only a warn).
            if not bus_synced(self.ports[target]):
                raise RuntimeError(f"{target}: bus not synced")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str],
               cpus: set[int] | None) -> Proc:
        proc = spawn(name, argv, env=env, cpus=cpus, logs=self.logs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        try:
            for proc in reversed(self.procs):
                stop(proc)
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            if self.pg_dir is not None:
                shutil.rmtree(self.pg_dir, ignore_errors=True)

    def check(self) -> None:
        for target in TARGETS:
            for mode in MODES:
                status, headers, raw = http_post(self.ports[target],
                                                 body(mode, "check").encode())
                if status != 200 or headers.get("x-bulwark-provider") not in ("bench", "cache"):
                    raise RuntimeError(f"{target} {mode}: HTTP {status} {raw[:200]!r}")

    def lua(self, mode: str, mix: str) -> Path:
        """A script per run: `distinct` bodies carry a fresh nonce, so that no run repeats
        another's requests (Lua's unseeded random would, and the shared store would hit)."""
        self.runs_started += 1
        prefix, suffix = body(mode).split(_MARK)
        path = self.logs / f"{mode}-{mix}-{self.runs_started}.lua"
        path.write_text(_LUA.format(prefix=json.dumps(prefix), suffix=json.dumps(suffix),
                                    distinct="true" if mix == "distinct" else "false",
                                    nonce=json.dumps(uuid.uuid4().hex)))
        return path

    def upstream_count(self) -> int:
        _, raw = http_get(self.up_port, "/_stats", timeout=2)
        return int(json.loads(raw)["chat"])

    def measure(self, target: str, mode: str, mix: str) -> Cell:
        port, pid = self.ports[target], self.pids[target]
        c = self.args.concurrency
        if self.args.warmup:
            run_wrk(self.wrk, port, self.lua(mode, mix), c, self.args.warmup, self.wrk_cpus)
        lua = self.lua(mode, mix)
        calls0 = self.upstream_count()
        s0 = cpu_ns(pid)
        raw, _ = run_wrk(self.wrk, port, lua, c, self.args.duration, self.wrk_cpus)
        s1 = cpu_ns(pid)
        calls1 = self.upstream_count()
        n = max(int(raw["requests"]), 1)
        seconds = raw["duration_us"] / 1e6
        return Cell(target=target, mode=mode, mix=mix, rps=n / seconds if seconds else 0.0,
                    p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
                    cpu_us=(s1 - s0) / 1000 / n,
                    errors=int(sum(v for k, v in raw.items() if k.startswith("err_"))),
                    upstream_per_req=(calls1 - calls0) / n)

    def run(self) -> None:
        self.check()
        total = self.args.repeat * len(self.args.modes) * len(MIXES) * len(TARGETS)
        i = 0
        for rnd in range(self.args.repeat):
            order = TARGETS if rnd % 2 == 0 else tuple(reversed(TARGETS))
            for mode in self.args.modes:
                for mix in MIXES:
                    for target in order:
                        i += 1
                        cell = self.measure(target, mode, mix)
                        self.runs.append(cell)
                        print(f"[{i}/{total}] {target} {mode} {mix}: {cell.rps:.0f} req/s, "
                              f"{cell.cpu_us:.1f} µs/req, errors {cell.errors}",
                              file=sys.stderr, flush=True)

    def medians(self) -> dict[tuple[str, str, str], Cell]:
        groups: dict[tuple[str, str, str], list[Cell]] = {}
        for c in self.runs:
            groups.setdefault((c.target, c.mode, c.mix), []).append(c)
        out = {}
        for key, cells in groups.items():
            out[key] = Cell(
                target=key[0], mode=key[1], mix=key[2],
                rps=statistics.median(c.rps for c in cells),
                p50_ms=statistics.median(c.p50_ms for c in cells),
                p99_ms=statistics.median(c.p99_ms for c in cells),
                cpu_us=statistics.median(c.cpu_us for c in cells),
                errors=sum(c.errors for c in cells),
                upstream_per_req=statistics.median(c.upstream_per_req or 0.0 for c in cells))
        return out

    def paired(self, target: str, mode: str, mix: str) -> list[float]:
        base = [c for c in self.runs if (c.target, c.mode, c.mix) == ("off", mode, mix)]
        other = [c for c in self.runs if (c.target, c.mode, c.mix) == (target, mode, mix)]
        return [o.cpu_us / b.cpu_us for b, o in zip(base, other, strict=False) if b.cpu_us]


def bus_synced(port: int) -> bool:
    """The gateway's bus has loaded its snapshot (within 20 s)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _, raw = http_get(port, "/health/ready", timeout=0.5)
            checks = json.loads(raw).get("checks", {})
            if checks.get("postgres:synced", [{}])[0].get("observedValue") is True:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return False


def report(b: Bench) -> Iterator[str]:
    med = b.medians()
    a = b.args
    yield (f"bench_cache: {a.duration} s per run after {a.warmup} s warm-up, c={a.concurrency},"
           f" median of {a.repeat} round(s); server CPU {sorted(b.server_cpus or [])}, "
           f"upstream/wrk/Postgres {sorted(b.helper_cpus or [])}")
    yield ""
    yield ("| mode | mix | cache | req/s | p50 ms | p99 ms | CPU µs/req | × off | per round "
           "| upstream calls/req |")
    yield "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"
    for mode in a.modes:
        for mix in MIXES:
            off = med[("off", mode, mix)]
            for target in TARGETS:
                c = med[(target, mode, mix)]
                ratio = c.cpu_us / off.cpu_us if off.cpu_us else 0.0
                rounds = b.paired(target, mode, mix) if target != "off" else []
                per = (f"{min(rounds):.3f}–{max(rounds):.3f}" if rounds else "–")
                yield (f"| {mode} | {mix} | {target} | {c.rps:.0f} | {c.p50_ms:.2f} | "
                       f"{c.p99_ms:.2f} | {c.cpu_us:.1f} | {ratio:.3f} | {per} | "
                       f"{c.upstream_per_req:.3f} |")
    yield ""
    worst = max(med[("fallback", m, x)].cpu_us / med[("off", m, x)].cpu_us
                for m in a.modes for x in MIXES)
    yield (f"fallback vs off, worst cell: {worst:.3f}× "
           f"({'within' if worst <= TARGET_RATIO else 'ABOVE'} the {TARGET_RATIO}× target)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the gateways under ops/bench_profile.py; DIR/<target>.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeat = 1, 0, 1
    if not shutil.which("wrk"):
        print("bench_cache: wrk not found; on Debian: apt-get install -y wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench_cache.") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            bench.start()
            bench.run()
        except (RuntimeError, OSError, asyncpg.PostgresError) as err:
            print(f"bench_cache: {err}", file=sys.stderr)
            for proc in bench.procs:
                print(f"--- {proc.name} ---\n{tail(proc.log)}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()
        for line in report(bench):
            print(line)
        if args.json:
            args.json.write_text(json.dumps([c.__dict__ for c in bench.runs], indent=1))
    return 0 if all(c.errors == 0 for c in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
