"""`GET /metrics`: the contract's names, counted from real traffic through simulators, with
bounded labels only; and the multiprocess directory's housekeeping (issue 8, item 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from bulwark import metrics, multiproc
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider

MSG: Any = [{"role": "user", "content": "Hi"}]
SECRET_PROMPT = "my-private-prompt-text-42"

CONTRACT = ("bulwark_requests_total", "bulwark_upstream_attempts_total",
            "bulwark_request_duration_seconds", "bulwark_time_to_first_token_seconds",
            "bulwark_circuit_breaker_state", "bulwark_degradation_level",
            "bulwark_fallback_total", "bulwark_dlq_messages")


async def scrape(gw: Gateway) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """The raw text and {(sample name, labels): value}."""
    async with aiohttp.ClientSession() as s, s.get(gw.server.make_url("/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    samples = {(smp.name, frozenset(smp.labels.items())): smp.value
               for fam in text_string_to_metric_families(text) for smp in fam.samples}
    return text, samples


def get(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
        **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def two(sim: SimFactory, gateway: GatewayFactory, **p1: Any) -> tuple[list[Sim], Gateway]:
    sims = [await sim("alpha"), await sim("beta")]
    gw = await gateway([provider("alpha", sims[0].url, priority=1, **p1),
                        provider("beta", sims[1].url, priority=2)])
    return sims, gw


async def test_contract_names_are_exported_before_any_traffic(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """Every contract metric has a sample as soon as the process serves (panels find data)."""
    _, gw = await two(sim, gateway)
    text, samples = await scrape(gw)
    names = {name for name, _ in samples}
    for metric in CONTRACT:
        assert any(n.startswith(metric) for n in names), metric
    assert get(samples, "bulwark_circuit_breaker_state", provider="beta") == 0.0
    assert get(samples, "bulwark_model_providers", model="default") == 2.0
    assert ("bulwark_fallback_total", frozenset({("model", "default"), ("kind", "cache")})) \
        in samples
    assert "bulwark_dlq_messages 0.0" in text


async def test_failover_and_retries_are_counted_by_provider_and_class(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """A 503 retried on alpha, then failed over to beta: attempts by class, a retry with its
    delay, a failover fallback, and the request as a 200."""
    sims, gw = await two(sim, gateway, retries=1)
    await sims[0].script(then={"status": 503})
    _, before = await scrape(gw)
    async with gw.client() as client:
        raw = await client.chat.completions.with_raw_response.create(model="default",
                                                                     messages=MSG)
    assert raw.headers["x-bulwark-fallback"] == "failover"
    _, after = await scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("bulwark_upstream_attempts_total", provider="alpha", model="default",
                 result="server_error") == 2
    assert delta("bulwark_upstream_attempts_total", provider="beta", model="default",
                 result="ok") == 1
    assert delta("bulwark_upstream_retries_total", provider="alpha") == 1
    assert delta("bulwark_upstream_retry_delay_seconds_count", provider="alpha") == 1
    assert delta("bulwark_fallback_total", model="default", kind="failover") == 1
    assert delta("bulwark_requests_total", api="chat", model="default", stream="false",
                 code="200") == 1
    assert delta("bulwark_request_duration_seconds_count", api="chat", model="default",
                 stream="false") == 1
    assert delta("bulwark_upstream_tokens_total", provider="beta", model="default",
                 type="output") > 0


async def test_stream_ttft_tokens_and_failure_status(sim: SimFactory,
                                                     gateway: GatewayFactory) -> None:
    """A stream records its time to first token and usage; a stream cut after its first
    tokens counts with the status of its final error event, not as a 200."""
    sims, gw = await two(sim, gateway)
    _, before = await scrape(gw)
    async with gw.client() as client:
        stream = await client.chat.completions.create(
            model="default", messages=MSG, stream=True, stream_options={"include_usage": True})
        async for _ in stream:
            pass
        await sims[0].script(then={"fault": "truncate"})
        broken = await client.chat.completions.create(model="default", messages=MSG,
                                                      stream=True)
        try:
            async for _ in broken:
                pass
        except openai.APIError:
            pass
    _, after = await scrape(gw)

    def delta(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert delta("bulwark_time_to_first_token_seconds_count", provider="alpha",
                 model="default") == 2
    assert delta("bulwark_upstream_tokens_total", provider="alpha", model="default",
                 type="input") > 0
    assert delta("bulwark_requests_total", api="chat", model="default", stream="true",
                 code="200") == 1
    assert delta("bulwark_requests_total", api="chat", model="default", stream="true",
                 code="503") == 1
    assert delta("bulwark_upstream_attempts_total", provider="alpha", model="default",
                 result="network_reset") == 1


async def test_labels_stay_bounded_and_hold_no_client_text(sim: SimFactory,
                                                           gateway: GatewayFactory) -> None:
    """A made-up model, a client's request id and the prompt never become label values:
    the model is 'unknown', and nothing the client wrote appears in the scrape."""
    _, gw = await two(sim, gateway)
    async with aiohttp.ClientSession() as s:
        for model in ("no-such-model-1", "no-such-model-2"):
            async with s.post(f"{gw.base_url}/chat/completions",
                              headers={"x-request-id": "client-id-xyz"},
                              json={"model": model, "messages": [
                                  {"role": "user", "content": SECRET_PROMPT}]}) as resp:
                assert resp.status == 404
        async with s.post(f"{gw.base_url}/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
        async with s.post(f"{gw.base_url}/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
                ) as resp:
            assert resp.status == 200
    text, samples = await scrape(gw)
    assert get(samples, "bulwark_requests_total", api="chat", model="unknown", stream="false",
               code="404") >= 2
    assert get(samples, "bulwark_requests_total", api="chat", model="unknown", stream="false",
               code="400") >= 1
    for leaked in ("no-such-model", "client-id-xyz", SECRET_PROMPT, "req_"):
        assert leaked not in text


async def test_breaker_state_and_available_providers_follow_the_breaker(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """Failures that open alpha's breaker show as state 2, a transition to open, and one
    provider fewer available for the model (within a sampling period)."""
    sims, gw = await two(sim, gateway, retries=0)
    await sims[0].script(then={"status": 500})
    async with gw.client() as client:
        for _ in range(6):
            await client.chat.completions.create(model="default", messages=MSG)

    async def opened() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        _, samples = await scrape(gw)
        ok = (get(samples, "bulwark_circuit_breaker_state", provider="alpha") == 2.0
              and get(samples, "bulwark_model_available_providers", model="default") == 1.0)
        return samples if ok else None

    from tests.procs import until
    samples = await until(opened, what="breaker open in /metrics")
    assert get(samples, "bulwark_circuit_breaker_transitions_total", provider="alpha",
               to_state="open") >= 1


def test_buffered_histogram_matches_prometheus_client() -> None:
    """Observations counted in-process and flushed give the buckets, count and sum that
    prometheus_client's own observe gives, boundaries included."""
    registry = CollectorRegistry()
    buckets = (0.1, 0.5, 1.0)
    direct = Histogram("x_seconds", "x", ["k"], buckets=buckets, registry=registry)
    buffered = metrics.BufferedHistogram(direct.labels("buffered"))
    values = [0.0, 0.1, 0.1000001, 0.5, 0.7, 1.0, 3.0, 1e9]
    for v in values:
        direct.labels("direct").observe(v)
        buffered.observe(v)
    buffered.flush()
    buffered.flush()  # nothing new: no double count
    samples = {(smp.name, smp.labels.get("le"), smp.labels["k"]): smp.value
               for fam in registry.collect() for smp in fam.samples
               if not smp.name.endswith("_created")}
    for (name, le, k), value in samples.items():
        if k == "direct":
            assert samples[(name, le, "buffered")] == value, (name, le)
    assert samples[("x_seconds_count", None, "buffered")] == len(values)


# -- the multiprocess directory -------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_tidy_removes_dead_live_gauges_but_keeps_counters_while_one_lives(tmp_path: Path) -> None:
    """With a live process in the formation, a dead one's live gauges go, its counters stay
    (the host's totals must not go backwards under the scraper)."""
    dead = _dead_pid()
    for name in (f"counter_{dead}.db", f"histogram_{dead}.db", f"gauge_livemax_{dead}.db",
                 f"gauge_livesum_{dead}.db", f"live-{dead}", f"counter_{os.getppid()}.db",
                 f"live-{os.getppid()}"):
        (tmp_path / name).write_bytes(b"")
    removed = multiproc.tidy(tmp_path, own_pid=os.getpid())
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"counter_{dead}.db", f"histogram_{dead}.db",
                           f"counter_{os.getppid()}.db", f"live-{os.getppid()}"])
    assert removed == {"gauges": 2, "totals": 0, "markers": 1}


def test_tidy_starts_afresh_when_the_whole_formation_is_gone(tmp_path: Path) -> None:
    """When no process of the formation is alive, everything they left goes."""
    dead = _dead_pid()
    for name in (f"counter_{dead}.db", f"histogram_{dead}.db", f"gauge_livemax_{dead}.db",
                 f"live-{dead}", "unrelated.txt"):
        (tmp_path / name).write_bytes(b"")
    multiproc.tidy(tmp_path, own_pid=os.getpid())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.txt"]


def test_default_dir_is_per_host_address(tmp_path: Path) -> None:
    """Processes serving one address share a directory; another port gets its own."""
    a = multiproc.default_dir("127.0.0.1", 8080)
    assert a == multiproc.default_dir("127.0.0.1", 8080)
    assert a != multiproc.default_dir("127.0.0.1", 8081)
    assert "/" not in a.name
