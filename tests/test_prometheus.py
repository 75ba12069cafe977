"""Dashboards and alerts as code, checked with the real tools: promtool on the rules and
their unit tests, and a real Prometheus scraping a two-process formation (real web processes,
healthd, Postgres, simulators) on which every dashboard panel's query returns data
(issue 8, items 1 and 2)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import multiprocess
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SimFactory
from tests.procs import ROOT, Daemon, Spawn, free_port, until, write_providers

pytestmark = pytest.mark.slow

RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "bulwark.json"
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}



def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's interval filled in as Grafana
    would for a 1 s scrape interval."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"].replace("$__rate_interval", "1m")))
    return out


def test_promtool_checks_the_rules() -> None:
    """The alerting rules are valid for Prometheus (promtool check rules)."""
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_every_alert_has_a_passing_unit_test() -> None:
    """promtool's unit tests pass, and every alert of the rules file is tested there."""
    done = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {line.split(":", 1)[1].strip() for line in RULES.read_text().splitlines()
              if line.strip().startswith("- alert:")}
    tested = {line.split(":", 1)[1].strip() for line in RULE_TESTS.read_text().splitlines()
              if line.strip().startswith("alertname:")}
    assert alerts == tested


def test_dashboard_is_importable_grafana_json() -> None:
    """The dashboard is Grafana JSON with a datasource input, unique panel ids, and a
    Prometheus query on every non-row panel."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("success rate", "fallbacks", "time to first token", "latency",
                  "circuit breakers", "degradation", "dead-letter"):
        assert topic in titles


class Prometheus:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{port}"
        self.log = log

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(
                f"{self.base}/api/v1/query", params={"query": expr}) as resp:
            body = await resp.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(f"{self.base}{path}") as resp:
            return await resp.json()


@pytest.fixture
async def prometheus_factory(tmp_path: Path) -> AsyncIterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    async def start(targets: dict[str, str]) -> Prometheus:
        port = free_port()
        scrape = "\n".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']"
            for job, addr in targets.items())
        shutil.copy(RULES, tmp_path / "alerts.yml")
        config = tmp_path / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          f"rule_files:\n  - alerts.yml\nscrape_configs:\n{scrape}\n")
        log = tmp_path / "prometheus.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=sink, stderr=sink, stdin=subprocess.DEVNULL)
        procs.append(proc)
        prom = Prometheus(proc, port, log)

        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{prom.base}/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False
        await until(ready, what="prometheus ready")
        return prom

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(smp.name, frozenset(smp.labels.items())): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def post_chat(base: str, body: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> int:
    # A session (so a connection) per request: SO_REUSEPORT spreads connections.
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}/v1/chat/completions", json=body, headers=headers or {}) as resp:
        await resp.read()
        return resp.status


async def test_a_real_prometheus_scrapes_two_web_processes_and_every_panel_has_data(
        sim: SimFactory, spawn: Spawn, pg_clean: str, tmp_path: Path,
        prometheus_factory: Any) -> None:
    """Two web processes on one port and healthd, scraped by Prometheus every second: any
    process's /metrics is the host's sum, failures and a failover show up, every dashboard
    query returns data, the alert rules load, a stopped process's gauges go away while its
    counts stay, and the last process to stop removes the files."""
    alpha, beta = await sim("alpha"), await sim("beta")
    providers = write_providers(tmp_path / "providers.toml", [alpha, beta])
    port, hport = free_port(), free_port()
    mdir = tmp_path / "metrics"
    env = {"BULWARK_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(mdir)}
    webs: list[Daemon] = [await spawn(pg_clean, providers, module="service", **env)
                          for _ in range(2)]
    await spawn(pg_clean, providers, HEALTHD_METRICS_PORT=str(hport),
                PROMETHEUS_MULTIPROC_DIR=str(mdir))
    base = f"http://127.0.0.1:{port}"

    async def both_live() -> bool:
        markers = {p.name for p in mdir.glob("live-*")} if mdir.exists() else set()
        if markers != {f"live-{w.pid}" for w in webs}:
            return False
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/health/live") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False
    await until(both_live, within=30, what="both web processes live")
    prom = await prometheus_factory({"bulwark-web": f"127.0.0.1:{port}",
                                     "bulwark-healthd": f"127.0.0.1:{hport}"})

    sent = 0
    for _ in range(16):
        assert await post_chat(base, CHAT) == 200
        sent += 1
    for _ in range(4):
        assert await post_chat(base, {**CHAT, "stream": True,
                                      "stream_options": {"include_usage": True}}) == 200
        sent += 1
    assert await post_chat(base, {**CHAT, "model": "nope"}) == 404
    sent += 1
    await alpha.script(then={"status": 503})
    for _ in range(6):
        assert await post_chat(base, CHAT) == 200  # beta answers: a failover
        sent += 1
    await alpha.script(then={"status": 503}, include_probes=True)
    await beta.script(then={"status": 503}, include_probes=True)
    for _ in range(2):
        # no-cache: the answers above are stored, and a stored one would answer instead.
        assert await post_chat(base, CHAT, {"Cache-Control": "no-cache"}) == 503
        sent += 1
    await alpha.script()
    await beta.script()

    # Whichever process answers, a scrape is the host's sum (each process moves its counts
    # to the shared files at least once a second).
    async def all_flushed() -> bool:
        return total(await scrape(f"{base}/metrics"), "bulwark_requests_total") == sent
    await until(all_flushed, what="every process's counts in the files")
    for _ in range(4):
        assert total(await scrape(f"{base}/metrics"), "bulwark_requests_total") == sent
    per_process = []
    for web in webs:
        merged = multiprocess.MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
            [str(mdir / f"counter_{web.pid}.db")])
        per_process.append(sum(s.value for m in merged for s in m.samples
                               if s.name == "bulwark_requests_total"))
    assert sum(per_process) == sent
    assert all(n > 0 for n in per_process), per_process

    async def prometheus_has_all() -> bool:
        got = await prom.query('sum(bulwark_requests_total{job="bulwark-web"})')
        return bool(got) and float(got[0]["value"][1]) == sent
    await until(prometheus_has_all, within=30, what="prometheus scraped every request")

    queries = panel_queries()
    empty: list[str] = []

    async def every_panel_has_data() -> bool:
        empty.clear()
        for title, expr in queries:
            if not await prom.query(expr):
                empty.append(f"{title}: {expr}")
        return not empty
    try:
        await until(every_panel_has_data, within=45, what="data in every panel")
    except AssertionError:
        raise AssertionError(f"panels without data: {empty}") from None
    failover = await prom.query('sum(bulwark_fallback_total{kind="failover"})')
    assert float(failover[0]["value"][1]) >= 1
    failed = await prom.query(
        'sum(bulwark_upstream_attempts_total{provider="alpha", result="server_error"})')
    # At least the breaker's threshold (5): then alpha's breaker opens, on the bus too.
    assert float(failed[0]["value"][1]) >= 5
    leader = await prom.query('bulwark_healthd_leader{job="bulwark-healthd"}')
    assert float(leader[0]["value"][1]) == 1.0

    rules = await prom.get("/api/v1/rules")
    loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]
    assert len(loaded) == 7
    assert all(r["health"] == "ok" for r in loaded), loaded

    # One process stops: its live gauges go with it, its counts stay in the host's sums.
    assert await webs[1].stop(signal.SIGTERM) == 0
    assert not (mdir / f"live-{webs[1].pid}").exists()
    after = await scrape(f"{base}/metrics")
    assert total(after, "bulwark_web_processes") == 1.0
    assert total(after, "bulwark_requests_total") == sent
    # The last one out leaves nothing behind.
    assert await webs[0].stop(signal.SIGTERM) == 0
    assert not list(mdir.glob("*.db")) and not list(mdir.glob("live-*"))
