"""The chat-path benchmark: the gateway beside a bare aiohttp pass-through, in one run.

    .venv/bin/python -m ops.bench_chat            # full run, ~4 minutes
    .venv/bin/python -m ops.bench_chat --quick    # smoke check, ~45 s
    .venv/bin/python -m ops.bench_chat --repeat 3 --duration 4   # docs/PERFORMANCE.md, ~9 min
    .venv/bin/python -m ops.bench_chat --telemetry --no-bus --modes json,stream \
        --concurrency 32 --repeat 3 --duration 3   # metrics and tracing cost, ~2 min

With `--telemetry`: two more gateways trace 10 % and 100 % of requests
(parentbased_traceidratio) to a local collector (rotel with its black-hole exporter), and
after the load `GET /metrics` is timed on a formation of four web processes sharing a port.

The processes, each on its own: a canned upstream (`ops/bench_upstream.py`, or the
simulator with `--upstream sim`), the pass-through (`ops/passthrough.py`), the gateway
(`python -m service`, no database, provider `bench` pointing at the upstream), the load
generator (wrk, with a Lua script that POSTs the chat body) and, unless `--no-bus`, the
`gateway+bus` target with what it needs:

- a second gateway, the same but with `DATABASE_URL` set, so that its state bus is live
  (LISTEN connection, a heartbeat query every 0.5 s, the error recorder);
- a throwaway embedded PostgreSQL (`bulwark.pgembed`, fsync off), migrated; or the
  database in `DATABASE_URL` when the environment sets it (rows for the providers `bench`
  and `spare` are then written there);
- `python -m healthd` (HEALTHD_INTERVAL_SEC=1, the same providers file; its probes are
  one-token chats, which the canned upstream answers), publishing health and beats;
- a publisher thread in this process writing ~`--bus-rate` state changes a second through
  `Bus.publish` for provider `spare` (same upstream, a model the load never asks for, so
  routing is unaffected): breaker open/closed and health degraded/healthy in turn, which
  the gateway applies to its view and breakers while it serves the load.

Both gateways read the same providers file (`bench` and `spare`). For every mode ×
concurrency it loads, in turn, the upstream directly, the pass-through and the gateways,
and reports:

- req/s and wrk's p50/p99 latency (for a stream: until the last byte);
- CPU µs per request of the server under load, from the on-CPU nanoseconds of all its
  threads (/proc/<pid>/task/*/schedstat) over the load window divided by the requests
  wrk completed — so it does not depend on how the processes share the cores;
- "added latency" at concurrency 1: gateway minus pass-through, and gateway minus direct;
- readiness (spawn → first 200 on /health/live) and the gateway's peak RSS (VmHWM);
- the busy CPU of everything else on the machine per window ("other CPU %"), to tell a
  measurement disturbed by someone else's work; `--repeat N` reports medians of N rounds;
- the bus's cost: gateway+bus beside gateway (CPU ratio, p50/p99 difference), judged
  against the spread of each between rounds, and both gateways' CPU while idle;
- the CPU of the bus helpers (Postgres, healthd, the publisher; "bus CPU %"), which run
  throughout and are not counted as "other".

Modes: `json` (non-streaming), `stream` (a 20-chunk SSE answer written back to back by the
upstream, so a proxy reads several events at once) and `paced` (the same events 1 ms apart,
as a provider sends tokens: every proxy handles every event on its own).

Placement: with 3+ CPUs the server under test, the upstream and wrk get one each; with 2,
the server under test gets one and the upstream shares the other with wrk. Postgres,
healthd and this process (the publisher) run on the upstream's and wrk's CPUs, never on the
server's.

Exit status 0 when every run completed without errors (targets missed or not), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import asyncpg

from bulwark.bus import Bus
from bulwark.pgembed import EmbeddedPostgres
from bulwark.state import View
from schema.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent

TARGETS = ("direct", "passthrough", "gateway", "gateway+bus")
GATEWAYS = ("gateway", "gateway+bus")
#: With --telemetry: the gateway tracing 10 % and 100 % of requests to a local collector
#: (rotel, black-hole exporter), beside `gateway` (metrics on, tracing off).
TRACE_TARGETS = {"gateway+trace10": "0.1", "gateway+trace100": "1.0"}
#: Issue 8's targets for the request path with metrics (and tracing at 10 %) on.
TELEMETRY_MAX = {"json": 1.45, "stream": 1.6, "paced": 1.6}
TRACE10_MAX = 1.6
MODES = ("json", "stream", "paced")
CONCURRENCY = (1, 32, 128)

# The targets (per web process).
CPU_RATIO_MAX = 1.6
ADDED_P50_MAX_MS = 0.4
ADDED_P99_MAX_MS = 1.0
RSS_MAX_MIB = 90.0
READY_MAX_S = 1.0

_READY_TIMEOUT_S = 20.0
_STOP_GRACE_S = 5.0

#: wrk's `done` hook: one line of JSON with what the run measured (other benchmarks reuse it).
LUA_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
    .. '"max_us":%d,"mean_us":%.1f,"err_connect":%d,"err_read":%d,"err_write":%d,'
    .. '"err_status":%d,"err_timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""
_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"

""" + LUA_DONE


def chat_body(mode: str) -> bytes:
    # The model name selects the upstream's pacing (ops/bench_upstream.py): the gateway maps
    # it to an upstream model of the same name, the pass-through forwards it as it is.
    return json.dumps({
        "model": "paced" if mode == "paced" else "default",
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Say hello in twenty words."}],
        "stream": mode != "json",
        "max_tokens": 64,
    }, separators=(",", ":")).encode()


# ---- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float  # monotonic, just before spawn

    @property
    def pid(self) -> int:
        return self.popen.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(argv: list[str], cpus: set[int] | None) -> list[str]:
    """`argv` under taskset: it execs, so the pid stays and every thread inherits the mask."""
    taskset = shutil.which("taskset")
    if not cpus or not taskset:
        return argv
    return [taskset, "-c", ",".join(map(str, sorted(cpus))), *argv]


def spawn(name: str, argv: list[str], *, env: dict[str, str], cpus: set[int] | None,
          logs: Path, cwd: Path = ROOT) -> Proc:
    log = logs / f"{name}.log"
    out: IO[bytes] = log.open("wb")
    started = time.monotonic()
    # A session of its own, so that stopping it takes down anything it started.
    popen = subprocess.Popen(pinned(argv, cpus), cwd=cwd, env=env, stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    out.close()
    return Proc(name, popen, log, started)


def stop(proc: Proc) -> None:
    if proc.popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.popen.wait(_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.popen.wait()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_post(port: int, body: bytes) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, path: str) -> float:
    """Seconds from spawn to the first 200 on `path`; polls every 2 ms."""
    deadline = proc.started + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               f"{tail(proc.log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _ = http_get(port, path, timeout=0.5)
            if status == 200:
                return time.monotonic() - proc.started
        time.sleep(0.002)
    raise RuntimeError(f"{proc.name} not ready on :{port}{path} after {_READY_TIMEOUT_S} s:\n"
                       f"{tail(proc.log)}")


def wait_synced(proc: Proc, port: int) -> float:
    """Seconds from spawn until /health/ready passes: listening, synced, healthd fresh."""
    deadline = proc.started + _READY_TIMEOUT_S
    body = b""
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               f"{tail(proc.log)}")
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            status, body = http_get(port, "/health/ready", timeout=0.5)
            if status == 200 and json.loads(body).get("status") == "pass":
                return time.monotonic() - proc.started
        time.sleep(0.01)
    raise RuntimeError(f"{proc.name} not synced after {_READY_TIMEOUT_S} s: {body[:300]!r}\n"
                       f"{tail(proc.log)}")


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of `pid`, in ns (scheduler accounting, not 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def thread_cpu_ns(tid: int) -> int:
    """On-CPU ns of one thread of this process."""
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0])
    return 0


def children_of(ppid: int) -> list[int]:
    """Direct children of `ppid` (Postgres's backends and auxiliary processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            if int(stat[stat.rindex(")") + 2:].split()[1]) == ppid:
                found.append(int(entry.name))
    return found


# ---- the bus helpers --------------------------------------------------------------------


class Publisher:
    """About `rate` state changes a second for one provider through `Bus.publish`, from a
    thread of this process: breaker open, health degraded, breaker closed, health healthy."""

    def __init__(self, dsn: str, provider: str, rate: float) -> None:
        self.dsn = dsn
        self.provider = provider
        self.rate = rate
        self.published = 0  # read by the main thread; an int store is atomic under the GIL
        self.failed = 0
        self.breaker_changes = 0
        self.error: BaseException | None = None
        self.tid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bus-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def cpu_ns(self) -> int:
        return thread_cpu_ns(self.tid) if self.tid else 0

    def _main(self) -> None:
        self.tid = threading.get_native_id()
        try:
            asyncio.run(self._run())
        except Exception as err:  # reported by the main thread; the run goes on without
            self.error = err

    async def _run(self) -> None:
        bus = Bus(self.dsn, View(), name="bench-publisher")
        start = time.monotonic()
        i = 0
        try:
            while not self._stop.is_set():
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # look at the stop flag again after every sleep
                step = i % 4
                if step in (0, 2):
                    row = await bus.publish(
                        self.provider, breaker="open" if step == 0 else "closed",
                        reason="bench_chat", source="bench-publisher",
                        open_for=30.0 if step == 0 else None)
                else:
                    row = await bus.publish(
                        self.provider, health="degraded" if step == 1 else "healthy",
                        reason="bench_chat", source="bench-publisher")
                if row is None:
                    self.failed += 1
                else:
                    self.published += 1
                    self.breaker_changes += step in (0, 2)
                i += 1
        finally:
            await bus.close()


class BusRig:
    """What gateway+bus needs: the database, healthd and the publisher."""

    def __init__(self) -> None:
        self.dsn = ""
        self.cluster: EmbeddedPostgres | None = None
        self.pg_dir: Path | None = None
        self.healthd: Proc | None = None
        self.publisher: Publisher | None = None

    def postmaster(self) -> int | None:
        if self.cluster is None:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.cluster.pgdata / "postmaster.pid").read_text().split()[0])
        return None

    def pids(self) -> list[int]:
        """Processes whose CPU is the bus's: healthd and the embedded cluster."""
        pids = [self.healthd.pid] if self.healthd else []
        pm = self.postmaster()
        if pm is not None:
            pids += [pm, *children_of(pm)]
        return pids

    def cpu_ns(self, pids: Sequence[int]) -> int:
        total = self.publisher.cpu_ns() if self.publisher else 0
        for pid in pids:
            with contextlib.suppress(OSError):
                total += cpu_ns(pid)
        return total

    def stop(self) -> None:
        """Everything it started, the cluster last (its clients first)."""
        if self.publisher is not None:
            self.publisher.stop()
        if self.healthd is not None:
            stop(self.healthd)
        if self.cluster is not None:
            try:
                self.cluster.stop()
            finally:
                if self.pg_dir is not None:
                    shutil.rmtree(self.pg_dir, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    mode: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    server_cpu_us: float | None  # per request; None for `direct` (see upstream_cpu_us)
    server_util: float | None  # share of one core over the window
    upstream_cpu_us: float
    wrk_util: float
    #: Busy CPU of everything else on the machine over the window, in cores: other people's
    #: work on a shared machine (plus kernel time charged to no process: a few % when quiet).
    other_util: float = 0.0
    upstream_calls: float | None = None  # upstream requests per client request
    #: CPU of the bus helpers (Postgres, healthd, the publisher) over the window, in cores;
    #: None without them. They run throughout, whichever target is loaded.
    bus_util: float | None = None
    bus_changes_per_s: float | None = None  # state changes the publisher wrote
    wrk_raw: dict[str, float] = field(default_factory=dict)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(wrk: str, port: int, lua: Path, concurrency: int, duration: int,
            cpus: set[int] | None) -> tuple[dict[str, float], float]:
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s", "-s", str(lua),
            f"http://127.0.0.1:{port}/v1/chat/completions"]
    before = _children_cpu()
    done = subprocess.run(pinned(argv, cpus), capture_output=True, text=True,
                          timeout=duration + 30, check=False)
    used = _children_cpu() - before
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):]), used
    raise RuntimeError(f"wrk gave no result (rc {done.returncode}):\n{done.stdout}\n"
                       f"{done.stderr}")


class Bench:
    def __init__(self, args: argparse.Namespace, logs: Path) -> None:
        self.args = args
        self.logs = logs
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}
        self.ready: dict[str, float] = {}
        self.pids: dict[str, int] = {}
        self.runs: list[Result] = []  # every measurement
        self.results: list[Result] = []  # one per cell: the median of its repeats
        self.targets = tuple(t for t in TARGETS if not (args.no_bus and t == "gateway+bus"))
        if args.telemetry:
            self.targets += tuple(TRACE_TARGETS)
        if args.baseline:
            self.targets += ("gateway@base",)
        self.scrape: dict[str, float] = {}
        self.server_cpus, self.upstream_cpus, self.wrk_cpus = placement(args.no_pin)
        # Postgres, healthd and the publisher: with the upstream and wrk, off the server's.
        self.helper_cpus = (None if self.upstream_cpus is None
                            else self.upstream_cpus | (self.wrk_cpus or set()))
        self.wrk = shutil.which("wrk") or ""
        self.luas: dict[str, Path] = {}
        self.memory: dict[str, float] = {}
        self.log_problems: dict[str, int] = {}
        self.first_problem: dict[str, str] = {}
        self.rig: BusRig | None = None
        self.idle: dict[str, float] = {}  # CPU share of one core while nothing is loaded
        self.spare_transitions = 0  # spare's breaker changes the gateway+bus applied

    # processes

    def start(self) -> None:
        py = sys.executable
        dsn_from_env = os.environ.get("DATABASE_URL")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BULWARK_", "OTEL_", "DATABASE_URL", "PORT", "HTTP_",
                                    "CB_", "HEALTHD_"))}
        env["PYTHONUNBUFFERED"] = "1"
        if self.helper_cpus is not None:
            # This process runs the publisher and starts Postgres, which inherits the mask.
            os.sched_setaffinity(0, self.helper_cpus)
        up_port = self.ports["direct"] = free_port()
        if self.args.upstream == "sim":
            up_argv = [py, "-m", "bulwark.sim", "--port", str(up_port)]
        else:
            up_argv = [py, "-m", "ops.bench_upstream", "--port", str(up_port)]
        up = self._spawn("upstream", up_argv, env, self.upstream_cpus)
        self.ready["upstream"] = wait_ready(up, up_port, "/health")
        self.pids["direct"] = up.pid
        base = f"http://127.0.0.1:{up_port}/v1"

        pt_port = self.ports["passthrough"] = free_port()
        pt = self._spawn("passthrough", [py, "-m", "ops.passthrough", "--port", str(pt_port),
                                         "--upstream", base], env, self.server_cpus)
        self.ready["passthrough"] = wait_ready(pt, pt_port, "/health/live")
        self.pids["passthrough"] = pt.pid

        # `spare` serves a model the load never asks for: the publisher's changes to it reach
        # the gateway's view and breakers without changing where a request goes. `bench`
        # serves that model too, so that `spare`'s breaker opening leaves it half its
        # providers: the fleet's level goes to `minor` (a header) and not to `severe`
        # (stored answers first), which would change what is measured. healthd probes with
        # a one-token chat, as the canned upstream has no /models.
        providers = self.logs / "providers.toml"
        providers.write_text(
            '[[providers]]\nname = "bench"\nkind = "openai"\nhealth_check = "chat"\n'
            f'base_url = "{base}"\n[providers.models]\n'
            'default = "sim-1"\npaced = "paced"\nspare = "sim-1"\n\n'
            '[[providers]]\nname = "spare"\nkind = "openai"\nhealth_check = "chat"\n'
            f'base_url = "{base}"\n[providers.models]\n'
            'spare = "sim-1"\n')
        # As healthd's; the web process judges healthd's freshness by it.
        gw_env = dict(env, HOST="127.0.0.1", BULWARK_PROVIDERS=str(providers),
                      HEALTHD_INTERVAL_SEC="1")
        gw_port = self.ports["gateway"] = free_port()
        gw = self._spawn("gateway", [py, "-m", self.args.gateway_module],
                         dict(gw_env, BULWARK_PORT=str(gw_port)), self.server_cpus)
        self.ready["gateway"] = wait_ready(gw, gw_port, "/health/live")
        self.pids["gateway"] = gw.pid
        if "gateway+bus" in self.targets:
            self._start_bus(py, gw_env, dsn_from_env)
        if self.args.telemetry:
            self._start_tracing(py, gw_env)
        if self.args.baseline:
            # The same gateway from another source tree (e.g. the commit before a feature),
            # loaded in the same run: the feature's own cost, apart from the machine's mood.
            port = self.ports["gateway@base"] = free_port()
            env_base = dict(gw_env, BULWARK_PORT=str(port), PYTHONPATH=str(self.args.baseline))
            proc = spawn("gateway@base", [py, "-m", self.args.gateway_module], env=env_base,
                         cpus=self.server_cpus, logs=self.logs, cwd=self.args.baseline)
            self.procs.append(proc)
            self.ready["gateway@base"] = wait_ready(proc, port, "/health/live")
            self.pids["gateway@base"] = proc.pid

    def _start_tracing(self, py: str, gw_env: dict[str, str]) -> None:
        """A local collector that drops what it receives, and one gateway per sampling ratio
        exporting to it (every span really serialised and sent)."""
        import rotel

        agent = Path(rotel.__file__).parent / "rotel-agent"
        otlp = free_port()
        self._spawn("rotel", [str(agent), "start", "--otlp-http-endpoint", f"127.0.0.1:{otlp}",
                              "--otlp-grpc-endpoint", f"127.0.0.1:{free_port()}",
                              "--exporter", "blackhole",
                              "--pid-file", str(self.logs / "rotel.pid"),
                              "--log-file", str(self.logs / "rotel.out")],
                    gw_env, self.helper_cpus)
        for target, ratio in TRACE_TARGETS.items():
            port = self.ports[target] = free_port()
            proc = self._spawn(target, [py, "-m", self.args.gateway_module], dict(
                gw_env, BULWARK_PORT=str(port), OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp}",
                OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=ratio,
                OTEL_SERVICE_NAME=target), self.server_cpus)
            self.ready[target] = wait_ready(proc, port, "/health/live")
            self.pids[target] = proc.pid

    def measure_scrape(self, processes: int = 4, scrapes: int = 50) -> None:
        """`GET /metrics` on a formation of `processes` web processes sharing one port, after
        traffic through them: wall time per scrape (each answer sums every process's files)."""
        py = sys.executable
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BULWARK_", "OTEL_"))}
        env.update(HOST="127.0.0.1", BULWARK_PORT=str(port),
                   BULWARK_PROVIDERS=str(self.logs / "providers.toml"),
                   PROMETHEUS_MULTIPROC_DIR=str(self.logs / "scrape-metrics"))
        procs = [self._spawn(f"scrape-web{i}", [py, "-m", "service"], env, None)
                 for i in range(processes)]
        try:
            for proc in procs:
                wait_ready(proc, port, "/health/live")
            for i in range(400):
                http_post(port, chat_body("json" if i % 2 else "stream"))
            times, size = [], 0
            for _ in range(scrapes):
                t0 = time.perf_counter()
                status, body = http_get(port, "/metrics", timeout=5.0)
                times.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"/metrics answered {status}")
                size = len(body)
            times.sort()
            self.scrape = {"processes": processes, "scrapes": scrapes,
                           "p50_ms": times[len(times) // 2] * 1000,
                           "p95_ms": times[int(len(times) * 0.95) - 1] * 1000,
                           "max_ms": times[-1] * 1000, "bytes": size,
                           "series": sum(1 for line in body.splitlines()
                                         if line and not line.startswith(b"#"))}
        finally:
            for proc in procs:
                stop(proc)

    def _start_bus(self, py: str, gw_env: dict[str, str], dsn_from_env: str | None) -> None:
        rig = self.rig = BusRig()
        if dsn_from_env:
            rig.dsn = dsn_from_env
        else:
            rig.pg_dir = Path(tempfile.mkdtemp(prefix="bench_chat-pg."))
            rig.cluster = EmbeddedPostgres(rig.pg_dir, throwaway=True)
            t0 = time.monotonic()
            rig.dsn = rig.cluster.start()
            self.ready["postgres"] = time.monotonic() - t0
        asyncio.run(migrate(rig.dsn))
        bus_env = dict(gw_env, DATABASE_URL=rig.dsn)
        rig.healthd = self._spawn("healthd", [py, "-m", "healthd"], bus_env, self.helper_cpus)
        gb_port = self.ports["gateway+bus"] = free_port()
        gb = self._spawn("gateway+bus", [py, "-m", self.args.gateway_module],
                         dict(bus_env, BULWARK_PORT=str(gb_port)), self.server_cpus)
        self.ready["gateway+bus"] = wait_ready(gb, gb_port, "/health/live")
        self.pids["gateway+bus"] = gb.pid
        # Listening, synced and hearing healthd: the bus is live before any load.
        self.ready["gateway+bus synced"] = wait_synced(gb, gb_port)
        rig.publisher = Publisher(rig.dsn, "spare", self.args.bus_rate)
        rig.publisher.start()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str],
               cpus: set[int] | None) -> Proc:
        proc = spawn(name, argv, env=env, cpus=cpus, logs=self.logs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        try:
            if self.rig and self.rig.publisher:
                self.rig.publisher.stop()
            for proc in reversed(self.procs):
                stop(proc)
        finally:
            if self.rig is not None:
                self.rig.stop()

    # checks

    def check_answers(self, modes: Sequence[str]) -> None:
        """One request per target and mode, checked, before any load."""
        for mode in modes:
            for target in self.targets:
                status, headers, body = http_post(self.ports[target], chat_body(mode))
                if status != 200:
                    raise RuntimeError(f"{target} {mode}: HTTP {status}: {body[:300]!r}")
                if target.startswith("gateway") and headers.get("x-bulwark-provider") != "bench":
                    raise RuntimeError(f"{target} {mode}: answered by "
                                       f"{headers.get('x-bulwark-provider')!r}")
                if mode == "json":
                    if not json.loads(body).get("choices"):
                        raise RuntimeError(f"{target} json: no choices in {body[:200]!r}")
                else:
                    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
                    if events[-1] != b"data: [DONE]" or len(events) < 21:
                        raise RuntimeError(f"{target} {mode}: stream of {len(events)} events "
                                           f"ending {events[-1][:80]!r}")

    def check_bus(self) -> None:
        """The publisher is writing, and the gateway+bus is still synced with healthd fresh."""
        rig = self.rig
        if rig is None or rig.publisher is None:
            return
        pub = rig.publisher
        if pub.error is not None:
            raise RuntimeError(f"bus publisher died: {pub.error!r}")
        if pub.published == 0:
            raise RuntimeError(f"bus publisher has written nothing ({pub.failed} failed)")
        status, body = http_get(self.ports["gateway+bus"], "/health/ready")
        if status != 200 or json.loads(body).get("status") != "pass":
            raise RuntimeError(f"gateway+bus not synced: HTTP {status} {body[:300]!r}")

    def upstream_count(self) -> int | None:
        path = "/_sim/stats" if self.args.upstream == "sim" else "/_stats"
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            status, body = http_get(self.ports["direct"], path)
            if status == 200:
                return int(json.loads(body)["chat"])
        return None

    def measure_idle(self, seconds: float) -> None:
        """Each gateway's (and the bus helpers') CPU with no load: the bus's background."""
        watched = {t: self.pids[t] for t in GATEWAYS if t in self.pids}
        helpers = self.rig.pids() if self.rig else []
        before = {t: cpu_ns(pid) for t, pid in watched.items()}
        h0 = self.rig.cpu_ns(helpers) if self.rig else 0
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        for t, pid in watched.items():
            self.idle[t] = (cpu_ns(pid) - before[t]) / 1e9 / wall
        if self.rig:
            self.idle["bus helpers"] = (self.rig.cpu_ns(helpers) - h0) / 1e9 / wall

    # load

    def lua(self, mode: str) -> Path:
        if mode not in self.luas:
            path = self.logs / f"chat_{mode}.lua"
            body = chat_body(mode).decode()
            path.write_text(_LUA.format(body=json.dumps(body)))
            self.luas[mode] = path
        return self.luas[mode]

    def measure(self, target: str, mode: str, concurrency: int) -> Result:
        port, lua = self.ports[target], self.lua(mode)
        if self.args.warmup:
            run_wrk(self.wrk, port, lua, concurrency, self.args.warmup, self.wrk_cpus)
        server = None if target == "direct" else self.pids[target]
        upstream = self.pids["direct"]
        rig = self.rig
        helpers = rig.pids() if rig else []
        pub0 = rig.publisher.published if rig and rig.publisher else 0
        calls0 = self.upstream_count()
        s0 = cpu_ns(server) if server else 0
        u0 = cpu_ns(upstream)
        h0 = rig.cpu_ns(helpers) if rig else 0
        m0 = machine_busy_s()
        t0 = time.monotonic()
        raw, wrk_cpu = run_wrk(self.wrk, port, lua, concurrency, self.args.duration,
                               self.wrk_cpus)
        wall = time.monotonic() - t0
        m1 = machine_busy_s()
        s1 = cpu_ns(server) if server else 0
        u1 = cpu_ns(upstream)
        h1 = rig.cpu_ns(helpers) if rig else 0
        pub1 = rig.publisher.published if rig and rig.publisher else 0
        calls1 = self.upstream_count()
        n = int(raw["requests"])
        seconds = raw["duration_us"] / 1e6
        errors = int(sum(v for k, v in raw.items() if k.startswith("err_")))
        per = max(n, 1)
        # wrk's own counters exclude the requests still in flight when it stops; the
        # upstream's include them, hence the tolerance in the report, not here.
        calls = None
        if calls0 is not None and calls1 is not None and target != "direct":
            calls = (calls1 - calls0) / per
        busy = (s1 - s0) / 1e9 + (u1 - u0) / 1e9 + (h1 - h0) / 1e9 + wrk_cpu
        return Result(
            target=target, mode=mode, concurrency=concurrency, requests=n, seconds=seconds,
            rps=n / seconds if seconds else 0.0,
            p50_ms=raw["p50_us"] / 1000, p90_ms=raw["p90_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000, max_ms=raw["max_us"] / 1000, errors=errors,
            server_cpu_us=(s1 - s0) / 1000 / per if server else None,
            server_util=(s1 - s0) / 1e9 / wall if server else None,
            upstream_cpu_us=(u1 - u0) / 1000 / per,
            wrk_util=wrk_cpu / wall,
            other_util=max(0.0, (m1 - m0 - busy) / wall),
            upstream_calls=calls,
            bus_util=(h1 - h0) / 1e9 / wall if rig else None,
            bus_changes_per_s=(pub1 - pub0) / wall if rig else None,
            wrk_raw=raw,
        )

    def run(self) -> None:
        modes = [m for m in self.args.modes if not (m == "paced" and self.args.upstream == "sim")]
        self.check_answers(modes)
        reps = self.args.repeat
        total = reps * len(modes) * len(self.args.concurrency) * len(self.targets)
        i = 0
        # Repeats are whole rounds, minutes apart, so that one slow spell of a shared machine
        # lands in one round and the median drops it.
        for rnd in range(reps):
            # Every other round in reverse order, so that no target always follows another
            # (gateway+bus would otherwise always run right after gateway).
            order = self.targets if rnd % 2 == 0 else tuple(reversed(self.targets))
            for mode in modes:
                for c in self.args.concurrency:
                    self.check_bus()
                    # Targets interleaved per cell, so that a slow spell hits all of them
                    # alike rather than one target's whole column.
                    for target in order:
                        i += 1
                        r = self.measure(target, mode, c)
                        self.runs.append(r)
                        cpu = (f"{r.server_cpu_us:7.1f} µs/req" if r.server_cpu_us
                               else "    (upstream)")
                        bus = (f"  bus {r.bus_util * 100:3.0f} %" if r.bus_util is not None
                               else "")
                        print(f"[{i:3d}/{total}] {target:11s} {mode:6s} c={c:<3d} "
                              f"{r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 "
                              f"{r.p99_ms:6.2f} ms  {cpu}  others {r.other_util * 100:3.0f} %"
                              f"{bus}  errors {r.errors}",
                              file=sys.stderr, flush=True)
        self.check_bus()
        groups: dict[tuple[str, str, int], list[Result]] = {}
        for r in self.runs:
            groups.setdefault((r.target, r.mode, r.concurrency), []).append(r)
        self.results = [median_result(g) for g in groups.values()]

    def read_logs(self) -> None:
        for proc in self.procs:
            if proc.name not in (*GATEWAYS, "healthd"):
                continue
            lines = proc.log.read_text(errors="replace").splitlines()
            problems = [line for line in lines
                        if '"level":"WARNING"' in line or '"level":"ERROR"' in line
                        or '"level":"CRITICAL"' in line]
            self.log_problems[proc.name] = len(problems)
            self.first_problem[proc.name] = problems[0][:300] if problems else ""
            if proc.name == "gateway+bus":
                self.spare_transitions = sum(
                    1 for line in lines
                    if "breaker transition" in line and '"provider":"spare"' in line)


def median_result(runs: list[Result]) -> Result:
    """Each measure's median over the repeats (independently), errors summed."""
    if len(runs) == 1:
        return runs[0]

    def med(get: Callable[[Result], float | None]) -> float | None:
        values = [v for v in map(get, runs) if v is not None]
        return statistics.median(values) if values else None

    first = runs[0]
    return Result(
        target=first.target, mode=first.mode, concurrency=first.concurrency,
        requests=sum(r.requests for r in runs), seconds=sum(r.seconds for r in runs),
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p90_ms=statistics.median(r.p90_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        max_ms=max(r.max_ms for r in runs), errors=sum(r.errors for r in runs),
        server_cpu_us=med(lambda r: r.server_cpu_us), server_util=med(lambda r: r.server_util),
        upstream_cpu_us=statistics.median(r.upstream_cpu_us for r in runs),
        wrk_util=statistics.median(r.wrk_util for r in runs),
        other_util=statistics.median(r.other_util for r in runs),
        upstream_calls=med(lambda r: r.upstream_calls),
        bus_util=med(lambda r: r.bus_util),
        bus_changes_per_s=med(lambda r: r.bus_changes_per_s),
    )


def placement(no_pin: bool) -> tuple[set[int] | None, set[int] | None, set[int] | None]:
    """CPUs for (server under test, upstream, wrk)."""
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None, None
    if len(cpus) == 2:
        return {cpus[0]}, {cpus[1]}, {cpus[1]}
    return {cpus[0]}, {cpus[1]}, {cpus[2]}


# ---- report -----------------------------------------------------------------------------


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def report(b: Bench) -> Iterator[str]:
    args = b.args
    by = {(r.target, r.mode, r.concurrency): r for r in b.results}
    modes = sorted({r.mode for r in b.results}, key=MODES.index)
    concs = sorted({r.concurrency for r in b.results})
    has_bus = b.rig is not None
    yield (f"upstream: {args.upstream}, {args.duration} s per run after {args.warmup} s of "
           f"warm-up, median of {args.repeat} round(s), wrk -t1; placement: server CPUs "
           f"{_cpus(b.server_cpus)}, upstream {_cpus(b.upstream_cpus)}, wrk {_cpus(b.wrk_cpus)}"
           + (f", Postgres/healthd/publisher {_cpus(b.helper_cpus)}" if has_bus else "")
           + f" of {os.cpu_count()}")
    yield ""
    bus_head, bus_rule = (" bus CPU % |", "--:|") if has_bus else ("", "")
    yield ("| target | mode | c | req/s | p50 ms | p99 ms | server CPU µs/req | server CPU % "
           f"| upstream CPU µs/req | wrk CPU % |{bus_head} other CPU % | errors |")
    yield f"|---|---|--:|--:|--:|--:|--:|--:|--:|--:|{bus_rule}--:|--:|"
    for mode in modes:
        for c in concs:
            for t in b.targets:
                r = by.get((t, mode, c))
                if r is None:
                    continue
                bus = f" {_f(_pct(r.bus_util), '{:.0f}')} |" if has_bus else ""
                yield (f"| {t} | {mode} | {c} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                       f"| {_f(r.server_cpu_us)} | {_f(_pct(r.server_util), '{:.0f}')} "
                       f"| {r.upstream_cpu_us:.1f} | {r.wrk_util * 100:.0f} |{bus}"
                       f" {r.other_util * 100:.0f} | {r.errors} |")
    yield ""
    yield from _ratio_table(b, by, modes, concs)
    if args.telemetry:
        yield from _telemetry_table(by, modes, concs)
    if b.scrape:
        sc = b.scrape
        yield (f"`GET /metrics` with {sc['processes']:.0f} web processes on one port "
               f"({sc['series']:.0f} series, {sc['bytes'] / 1024:.0f} KiB), {sc['scrapes']:.0f} "
               f"scrapes: p50 {sc['p50_ms']:.1f} ms, p95 {sc['p95_ms']:.1f} ms, max "
               f"{sc['max_ms']:.1f} ms.")
        yield ""
    yield from _latency_table(b, by, modes)
    if has_bus:
        yield from _bus_tables(b, by, modes, concs)
    hwm = {t: b.memory.get(f"{t}_hwm_mib", 0.0) for t in GATEWAYS if t in b.targets}
    worst = max(hwm.values(), default=0.0)
    yield ("Peak RSS (VmHWM) after the load: "
           + ", ".join(f"{t} {v:.1f} MiB" for t, v in hwm.items())
           + f" (target ≤ {RSS_MAX_MIB:.0f}: {'ok' if worst <= RSS_MAX_MIB else 'MISSED'}); "
           f"pass-through {b.memory.get('passthrough_hwm_mib', 0.0):.1f} MiB.")
    ready = {t: b.ready[t] for t in GATEWAYS if t in b.ready}
    slowest = max(ready.values(), default=0.0)
    yield ("Ready after start (spawn → first 200 on /health/live): "
           + ", ".join(f"{t} {v:.3f} s" for t, v in ready.items())
           + f" (target ≤ {READY_MAX_S:.0f} s: {'ok' if slowest <= READY_MAX_S else 'MISSED'}), "
           f"pass-through {b.ready.get('passthrough', 0.0):.3f} s"
           + (f"; gateway+bus synced with healthd fresh (/health/ready pass) after "
              f"{b.ready['gateway+bus synced']:.3f} s" if "gateway+bus synced" in b.ready else "")
           + (f"; Postgres started in {b.ready['postgres']:.1f} s" if "postgres" in b.ready
              else "") + ".")
    # wrk counts only the answers it received; the upstream also counts those in flight when
    # wrk stopped (up to c), so a little over 1 is expected at c=128 in short runs.
    note = (" (healthd runs throughout: its probes, 2 a second, are counted too, which shows "
            "where requests are few, as in paced c=1)" if has_bus else "")
    yield f"Upstream calls per request (1 = no retries){note}:"
    for t in GATEWAYS:
        calls = ", ".join(f"{r.mode} c={r.concurrency} {r.upstream_calls:.3f}"
                          for r in b.results if r.target == t and r.upstream_calls is not None)
        if calls:
            yield f"- {t}: {calls}."
    for name, count in b.log_problems.items():
        first = b.first_problem.get(name, "")
        yield (f"{name} log lines at WARNING or above: {count}"
               + (" (a retry or failover would log one)" if name == "gateway" else "")
               + (f"; the first: {first}" if first else "."))


def _ratio_table(b: Bench, by: dict[tuple[str, str, int], Result], modes: list[str],
                 concs: list[int]) -> Iterator[str]:
    bus = "gateway+bus" in b.targets
    yield (f"CPU per request, gateway / pass-through (target ≤ {CPU_RATIO_MAX}); "
           "per-core capacity = 1 s / CPU per request:")
    yield ""
    yield ("| mode | c | pass-through µs | gateway µs | ratio | gateway req/s per core |"
           + (" gateway+bus µs | ratio |" if bus else "") + " verdict |")
    yield "|---|--:|--:|--:|--:|--:|" + ("--:|--:|" if bus else "") + "---|"
    for mode in modes:
        for c in concs:
            pt, gw = by.get(("passthrough", mode, c)), by.get(("gateway", mode, c))
            if not (pt and gw and pt.server_cpu_us and gw.server_cpu_us):
                continue
            ratio = gw.server_cpu_us / pt.server_cpu_us
            worst = ratio
            extra = ""
            gb = by.get(("gateway+bus", mode, c))
            if bus:
                if gb and gb.server_cpu_us:
                    bus_ratio = gb.server_cpu_us / pt.server_cpu_us
                    worst = max(worst, bus_ratio)
                    extra = f" {gb.server_cpu_us:.1f} | {bus_ratio:.2f} |"
                else:
                    extra = " – | – |"
            yield (f"| {mode} | {c} | {pt.server_cpu_us:.1f} | {gw.server_cpu_us:.1f} "
                   f"| {ratio:.2f} | {1e6 / gw.server_cpu_us:.0f} |{extra} "
                   f"{'ok' if worst <= CPU_RATIO_MAX else 'MISSED'} |")
    yield ""


def _telemetry_table(by: dict[tuple[str, str, int], Result], modes: list[str],
                     concs: list[int]) -> Iterator[str]:
    yield ("Telemetry: CPU per request against the pass-through. `gateway` has metrics on "
           "(always); trace10/trace100 also export spans of 10 % / 100 % of requests to a local "
           "collector (targets: metrics ≤ 1.45× JSON, ≤ 1.6× stream; tracing at 10 % ≤ 1.6×; "
           "100 % is reported, not judged):")
    yield ""
    yield ("| mode | c | pass-through µs | gateway µs | ratio | trace10 µs | ratio "
           "| trace100 µs | ratio | verdict | gateway@base µs | ratio | gateway / base |")
    yield "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|"
    for mode in modes:
        for c in concs:
            pt = by.get(("passthrough", mode, c))
            base = by.get(("gateway@base", mode, c))
            cells = [by.get((t, mode, c)) for t in ("gateway", *TRACE_TARGETS)]
            if not (pt and pt.server_cpu_us and all(r and r.server_cpu_us for r in cells)):
                continue
            us = [r.server_cpu_us for r in cells if r and r.server_cpu_us]
            ratios = [u / pt.server_cpu_us for u in us]
            ok = ratios[0] <= TELEMETRY_MAX[mode] and ratios[1] <= TRACE10_MAX
            tail = " – | – | – |"
            if base and base.server_cpu_us:
                tail = (f" {base.server_cpu_us:.1f} | {base.server_cpu_us / pt.server_cpu_us:.2f} "
                        f"| {us[0] / base.server_cpu_us:.2f} |")
            yield (f"| {mode} | {c} | {pt.server_cpu_us:.1f} | "
                   + " | ".join(f"{u:.1f} | {r:.2f}" for u, r in zip(us, ratios, strict=True))
                   + f" | {'ok' if ok else 'MISSED'} |{tail}")
    yield ""


def _latency_table(b: Bench, by: dict[tuple[str, str, int], Result],
                   modes: list[str]) -> Iterator[str]:
    bus = "gateway+bus" in b.targets
    yield (f"Added latency at c=1 (target: p50 ≤ {ADDED_P50_MAX_MS} ms, p99 ≤ "
           f"{ADDED_P99_MAX_MS} ms, gateway − pass-through):")
    yield ""
    yield ("| mode | gateway − pass-through p50 / p99 ms |"
           + (" gateway+bus − pass-through p50 / p99 ms |" if bus else "")
           + " gateway − direct p50 / p99 ms | pass-through − direct p50 / p99 ms | verdict |")
    yield "|---|--:|" + ("--:|" if bus else "") + "--:|--:|---|"
    for mode in modes:
        d, pt, gw = (by.get((t, mode, 1)) for t in ("direct", "passthrough", "gateway"))
        if not (d and pt and gw):
            continue
        a50, a99 = gw.p50_ms - pt.p50_ms, gw.p99_ms - pt.p99_ms
        ok = a50 <= ADDED_P50_MAX_MS and a99 <= ADDED_P99_MAX_MS
        extra = ""
        if bus:
            gb = by.get(("gateway+bus", mode, 1))
            if gb:
                b50, b99 = gb.p50_ms - pt.p50_ms, gb.p99_ms - pt.p99_ms
                ok = ok and b50 <= ADDED_P50_MAX_MS and b99 <= ADDED_P99_MAX_MS
                extra = f" {b50:+.3f} / {b99:+.3f} |"
            else:
                extra = " – |"
        # A paced answer takes ~21 upstream timer gaps of 1-2 ms: their jitter, not the
        # proxies, decides its percentiles, so its difference is shown but not judged.
        verdict = "info only" if mode == "paced" else "ok" if ok else "MISSED"
        yield (f"| {mode} | {a50:+.3f} / {a99:+.3f} |{extra} {gw.p50_ms - d.p50_ms:+.3f} / "
               f"{gw.p99_ms - d.p99_ms:+.3f} | {pt.p50_ms - d.p50_ms:+.3f} / "
               f"{pt.p99_ms - d.p99_ms:+.3f} | {verdict} |")
    yield ""


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values) if len(values) > 1 else 0.0


def _bus_tables(b: Bench, by: dict[tuple[str, str, int], Result], modes: list[str],
                concs: list[int]) -> Iterator[str]:
    """gateway+bus beside gateway, each difference beside the spread between rounds."""
    rounds: dict[tuple[str, str, int], list[Result]] = {}
    for r in b.runs:
        rounds.setdefault((r.target, r.mode, r.concurrency), []).append(r)
    reps = b.args.repeat
    # What the bus costs while idle (heartbeats, notifications, freshness checks), spread
    # over the requests of a window: the cost to expect, to set beside the measured one.
    background = b.idle.get("gateway+bus", 0.0) - b.idle.get("gateway", 0.0)
    yield ("The bus's cost: gateway+bus against gateway (ratio: of the medians; per round: "
           "the paired ratios of each round). Noise = the larger of the two targets' spread "
           "(max − min) between rounds; the bus costs \"nothing measurable\" when gateway+bus "
           "is not above gateway by more than that"
           + ("." if reps > 1 else "; one round gives no spread."))
    yield ""
    yield ("| mode | c | gateway µs | gateway+bus µs | ratio | per round | CPU noise ± "
           "| idle bus µs/req | Δp50 ms | p50 noise ± | Δp99 ms | p99 noise ± "
           "| bus changes/s | verdict |")
    yield "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
    spreads: dict[str, list[float]] = {"cpu": [], "p50": [], "p99": []}
    for mode in modes:
        for c in concs:
            gw, gb = by.get(("gateway", mode, c)), by.get(("gateway+bus", mode, c))
            if not (gw and gb and gw.server_cpu_us and gb.server_cpu_us):
                continue
            both = rounds[("gateway", mode, c)], rounds[("gateway+bus", mode, c)]
            cpu_noise = max(_spread([r.server_cpu_us or 0.0 for r in rs]) / med
                            for rs, med in zip(both, (gw.server_cpu_us, gb.server_cpu_us),
                                               strict=True))
            p50_noise = max(_spread([r.p50_ms for r in rs]) for rs in both)
            p99_noise = max(_spread([r.p99_ms for r in rs]) for rs in both)
            spreads["cpu"].append(cpu_noise)
            spreads["p50"].append(p50_noise)
            spreads["p99"].append(p99_noise)
            ratio = gb.server_cpu_us / gw.server_cpu_us
            d50, d99 = gb.p50_ms - gw.p50_ms, gb.p99_ms - gw.p99_ms
            paired = [y.server_cpu_us / x.server_cpu_us for x, y in zip(*both, strict=False)
                      if x.server_cpu_us and y.server_cpu_us]
            # Paced latencies are the upstream's timer jitter (see above): CPU only there.
            diffs = [("CPU", ratio - 1, cpu_noise, "{:+.1%}")]
            if mode != "paced":
                diffs += [("p50", d50, p50_noise, "{:+.2f} ms"), ("p99", d99, p99_noise,
                                                                 "{:+.2f} ms")]
            above = [f"{k} {fmt.format(v)}" for k, v, noise, fmt in diffs if v > noise]
            below = [f"{k} {fmt.format(v)}" for k, v, noise, fmt in diffs if v < -noise]
            if reps < 2:
                verdict = "one round: no noise estimate"
            elif above:
                verdict = "above noise: " + ", ".join(above)
            else:
                # Lower by more than the spread is no cost of the bus: two processes of the
                # same code differ by a few % (see docs/PERFORMANCE.md).
                verdict = "nothing measurable" + (
                    f" (gateway+bus lower: {', '.join(below)})" if below else "")
            idle_us = background * 1e6 / gb.rps if gb.rps else None
            yield (f"| {mode} | {c} | {gw.server_cpu_us:.1f} | {gb.server_cpu_us:.1f} "
                   f"| {ratio:.3f} | {min(paired, default=0):.3f}–{max(paired, default=0):.3f} "
                   f"| {cpu_noise * 100:.1f} % | {_f(idle_us, '{:.2f}')} "
                   f"| {d50:+.2f} | {p50_noise:.2f} | {d99:+.2f} | {p99_noise:.2f} "
                   f"| {_f(gb.bus_changes_per_s)} | {verdict} |")
    yield ""
    if reps > 1 and spreads["cpu"]:
        yield ("Run-to-run spread of the two gateways over these cells (median / largest): "
               f"CPU {statistics.median(spreads['cpu']) * 100:.1f} / "
               f"{max(spreads['cpu']) * 100:.1f} %, p50 {statistics.median(spreads['p50']):.2f}"
               f" / {max(spreads['p50']):.2f} ms, p99 {statistics.median(spreads['p99']):.2f} / "
               f"{max(spreads['p99']):.2f} ms.")
    idle = b.idle
    if idle:
        yield (f"Idle CPU over {b.args.idle:g} s with no load (the bus's background): gateway "
               f"{idle.get('gateway', 0.0) * 100:.2f} % of a core, gateway+bus "
               f"{idle.get('gateway+bus', 0.0) * 100:.2f} % (the difference, "
               f"{background * 1000:.1f} ms of CPU a second, spread over a window's requests "
               "is the \"idle bus µs/req\" above); Postgres + healthd + publisher "
               f"{idle.get('bus helpers', 0.0) * 100:.1f} %.")
    pub = b.rig.publisher if b.rig else None
    if pub is not None:
        yield (f"Publisher: {pub.published} changes to `spare` written ({pub.failed} failed), "
               f"{pub.breaker_changes} of them breaker changes; gateway+bus logged "
               f"{b.spare_transitions} breaker transitions of `spare` (healthd may add its "
               "own).")
    yield ""


def _pct(x: float | None) -> float | None:
    return None if x is None else x * 100


def _cpus(cpus: set[int] | None) -> str:
    return "any" if cpus is None else ",".join(map(str, sorted(cpus)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench_chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (wrk: whole s)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over every cell; the report shows each measure's median")
    parser.add_argument("--quick", action="store_true", help="1 s runs, no warm-up: a smoke check")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                        default=list(CONCURRENCY), help="comma-separated, default 1,32,128")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                        help="comma-separated of json,stream,paced")
    parser.add_argument("--upstream", choices=("raw", "sim"), default="raw",
                        help="raw: ops/bench_upstream.py (default); sim: bulwark/sim.py")
    parser.add_argument("--gateway-module", default="service",
                        help="module run as the gateway (a profiling wrapper, say)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-bus", action="store_true",
                        help="skip gateway+bus (and Postgres, healthd, the publisher)")
    parser.add_argument("--bus-rate", type=float, default=10.0,
                        help="state changes a second the publisher writes (default 10)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of idle CPU measured on both gateways before the load")
    parser.add_argument("--telemetry", action="store_true",
                        help="also load gateways tracing 10 %% and 100 %% of requests to a local "
                             "collector (rotel), and time /metrics on 4 web processes")
    parser.add_argument("--baseline", type=Path,
                        help="also load `gateway@base`: the gateway run from this source tree "
                             "(e.g. `git archive <commit> | tar -x -C DIR`)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--logs", type=Path,
                        help="keep the processes' logs in this directory (default: discarded)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeat, args.idle = 1, 0, 1, 1.0
    if args.duration < 1 or args.warmup < 0 or args.repeat < 1 or args.idle < 0:
        parser.error("--duration and --repeat must be at least 1, --warmup and --idle at "
                     "least 0")
    if args.bus_rate <= 0:
        parser.error("--bus-rate must be positive")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}")
    if not shutil.which("wrk"):
        print("bench_chat: wrk not found; on Debian: apt-get install -y wrk", file=sys.stderr)
        return 2

    # SIGTERM unwinds like Ctrl-C, so that the finally below stops what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench_chat.") as tmp:
        logs = Path(tmp)
        if args.logs:
            logs = args.logs
            logs.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, logs)
        try:
            bench.start()
            print("ready: " + ", ".join(f"{k} {v:.3f} s" for k, v in bench.ready.items()),
                  file=sys.stderr, flush=True)
            if args.idle:
                bench.measure_idle(args.idle)
            bench.run()
            if args.telemetry:
                bench.measure_scrape()
            for name in ("passthrough", *GATEWAYS):
                if name in bench.pids:
                    pid = bench.pids[name]
                    bench.memory[f"{name}_hwm_mib"] = status_kib(pid, "VmHWM") / 1024
                    bench.memory[f"{name}_rss_mib"] = status_kib(pid, "VmRSS") / 1024
            bench.read_logs()
        except (RuntimeError, OSError, subprocess.SubprocessError, asyncpg.PostgresError) as err:
            print(f"bench_chat: {err}", file=sys.stderr)
            for proc in bench.procs:
                print(f"--- {proc.name} log ---\n{tail(proc.log)}", file=sys.stderr)
            return 1
        finally:
            bench.stop_all()
        for line in report(bench):
            print(line)
        if args.json:
            args.json.write_text(json.dumps({
                "results": [asdict(r) for r in bench.results],
                "runs": [asdict(r) for r in bench.runs], "ready_s": bench.ready,
                "memory_mib": bench.memory, "idle_cpu": bench.idle, "scrape": bench.scrape,
                "bus": None if bench.rig is None or bench.rig.publisher is None else {
                    "published": bench.rig.publisher.published,
                    "failed": bench.rig.publisher.failed,
                    "spare_transitions_applied": bench.spare_transitions},
                "duration_s": args.duration, "upstream": args.upstream,
                "cpus": os.cpu_count()}, indent=1))
    return 0 if bench.results and all(r.errors == 0 for r in bench.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
