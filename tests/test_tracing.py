"""OpenTelemetry traces read back from a real collector (rotel): a SERVER span per request, a
CLIENT span per upstream attempt with the GenAI attributes, the W3C trace context continued
from the client and passed to the upstream, events for retries and failovers, content only
when enabled, and a dead collector that changes nothing for clients (issue 8, item 3)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from opentelemetry.sdk.trace.sampling import ParentBased

from bulwark import logs, telemetry
from bulwark.logs import setup_logging
from service.keys import TRACING
from tests.conftest import Gateway, GatewayFactory, Sim, SimFactory, provider
from tests.otlp import Collector, SpanRecord
from tests.procs import Spawn, free_port, until, write_providers

MSG: Any = [{"role": "user", "content": "What is the secret word?"}]
PROMPT = "What is the secret word?"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SERVER, CLIENT, ERROR = 2, 3, 2


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    c = Collector(tmp_path_factory.mktemp("rotel"))
    yield c
    c.close()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, hook = list(root.handlers), root.level, logs.trace_ids
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.trace_ids = hook


def otel_env(collector: Collector, service: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SERVICE_NAME": service,
            "OTEL_BSP_SCHEDULE_DELAY": "50", **extra}


async def two(sim: SimFactory, gateway: GatewayFactory, env: dict[str, str],
              **p1: Any) -> tuple[list[Sim], Gateway]:
    sims = [await sim("alpha"), await sim("beta")]
    gw = await gateway([provider("alpha", sims[0].url, priority=1, **p1),
                        provider("beta", sims[1].url, priority=2)], env=env)
    return sims, gw


async def chat(gw: Gateway, body: dict[str, Any], headers: dict[str, str] | None = None
               ) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(
            f"{gw.base_url}/chat/completions", json=body, headers=headers or {}) as resp:
        return resp.status, await resp.read()


async def spans(collector: Collector, service: str, n: int) -> list[SpanRecord]:
    async def enough() -> list[SpanRecord] | None:
        got = collector.received.of(service)
        return got if len(got) >= n else None
    return await until(enough, within=20, what=f"{n} spans of {service} at the collector")


async def sim_log(s: Sim) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(
            s.server.make_url("/_sim/log")) as resp:
        entries: list[dict[str, Any]] = await resp.json()
        return [e for e in entries if e["path"].endswith("/chat/completions")]


async def test_request_and_attempts_reach_the_collector_with_genai_attributes(
        collector: Collector, sim: SimFactory, gateway: GatewayFactory) -> None:
    """The client's trace is continued: a SERVER span under its parent, a failed CLIENT span
    for alpha (error.type) and a good one for beta with the GenAI attributes, a failover
    event, and each upstream received its own attempt span as `traceparent`."""
    service = f"t-{uuid.uuid4().hex[:8]}"
    sims, gw = await two(sim, gateway, otel_env(collector, service), retries=0)
    await sims[0].script(then={"status": 503})
    status, _ = await chat(gw, {"model": "default", "messages": MSG, "max_tokens": 50,
                                "temperature": 0.3},
                           {"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert status == 200
    got = await spans(collector, service, 3)
    server = next(s for s in got if s.kind == SERVER)
    assert (server.trace_id, server.parent_span_id) == (TRACE, PARENT)
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert "bulwark.failover" in [name for name, _ in server.events]
    attempts = sorted((s for s in got if s.kind == CLIENT),
                      key=lambda s: s.attributes["bulwark.attempt"])
    assert [s.attributes["bulwark.provider"] for s in attempts] == ["alpha", "beta"]
    failed, ok = attempts
    assert failed.status == ERROR and failed.attributes["error.type"] == "server_error"
    for span in attempts:
        assert span.name == "chat sim-1"
        assert span.trace_id == TRACE and span.parent_span_id == server.span_id
    attrs = ok.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "sim-1"
    assert attrs["gen_ai.request.max_tokens"] == 50
    assert attrs["gen_ai.request.temperature"] == 0.3
    assert attrs["gen_ai.request.stream"] is False
    assert attrs["gen_ai.response.id"]
    assert attrs["gen_ai.response.model"]
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert "error.type" not in attrs
    assert server.resource["service.name"] == service
    (seen_alpha,), (seen_beta,) = await sim_log(sims[0]), await sim_log(sims[1])
    assert seen_alpha["headers"]["traceparent"] == f"00-{TRACE}-{failed.span_id}-01"
    assert seen_beta["headers"]["traceparent"] == f"00-{TRACE}-{ok.span_id}-01"


async def test_stream_span_has_first_chunk_usage_and_finish(
        collector: Collector, sim: SimFactory, gateway: GatewayFactory) -> None:
    """A streamed answer's attempt span records the first chunk, finish reasons and usage."""
    service = f"t-{uuid.uuid4().hex[:8]}"
    _, gw = await two(sim, gateway, otel_env(collector, service))
    status, body = await chat(gw, {"model": "default", "messages": MSG, "stream": True,
                                   "stream_options": {"include_usage": True}})
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    got = await spans(collector, service, 2)
    attempt = next(s for s in got if s.kind == CLIENT)
    assert attempt.attributes["gen_ai.request.stream"] is True
    assert attempt.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert attempt.attributes["gen_ai.usage.output_tokens"] > 0
    assert "gen_ai.first_chunk" in [name for name, _ in attempt.events]


async def test_malformed_traceparent_is_ignored(collector: Collector, sim: SimFactory,
                                                gateway: GatewayFactory) -> None:
    """A broken `traceparent` is no error: the request is answered and a new trace starts."""
    service = f"t-{uuid.uuid4().hex[:8]}"
    _, gw = await two(sim, gateway, otel_env(collector, service))
    for bad in ("garbage", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-zz-01"):
        status, _ = await chat(gw, {"model": "default", "messages": MSG}, {"traceparent": bad})
        assert status == 200
    got = await spans(collector, service, 6)
    servers = [s for s in got if s.kind == SERVER]
    assert len(servers) == 3
    assert all(s.parent_span_id == "" and s.trace_id != TRACE for s in servers)


@pytest.mark.parametrize("capture", [True, False], ids=["capture-on", "capture-off"])
async def test_prompt_and_answer_only_when_capture_is_enabled(
        collector: Collector, sim: SimFactory, gateway: GatewayFactory, capture: bool) -> None:
    """With OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true the attempt span carries
    the messages and the answer (streamed or not); without it, no prompt or answer text."""
    service = f"t-{uuid.uuid4().hex[:8]}"
    extra = {telemetry.CAPTURE_ENV: "true"} if capture else {}
    _, gw = await two(sim, gateway, otel_env(collector, service, **extra))
    await chat(gw, {"model": "default", "messages": MSG})
    await chat(gw, {"model": "default", "messages": MSG, "stream": True})
    got = await spans(collector, service, 4)
    attempts = [s for s in got if s.kind == CLIENT]
    everything = json.dumps([[s.attributes, s.events] for s in got])
    if capture:
        for span in attempts:
            inputs = json.loads(span.attributes["gen_ai.input.messages"])
            assert inputs[0]["parts"][0]["content"] == PROMPT
            output = json.loads(span.attributes["gen_ai.output.messages"])
            assert "Hello from sim alpha" in output[0]["parts"][0]["content"]
    else:
        assert PROMPT not in everything
        assert "Hello from sim" not in everything
        assert all("gen_ai.input.messages" not in s.attributes for s in attempts)


async def test_retries_are_span_events_and_log_lines_carry_the_trace(
        collector: Collector, sim: SimFactory, gateway: GatewayFactory,
        restore_logging: None) -> None:
    """A retry is an event on the request's span, and the dispatcher's log line about the
    failed attempt carries that request's trace_id and span_id."""
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    service = f"t-{uuid.uuid4().hex[:8]}"
    sims, gw = await two(sim, gateway, otel_env(collector, service), retries=1)
    await sims[0].script(steps=[{"status": 503}])
    status, _ = await chat(gw, {"model": "default", "messages": MSG},
                           {"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert status == 200
    got = await spans(collector, service, 3)
    server = next(s for s in got if s.kind == SERVER)
    retry = [attrs for name, attrs in server.events if name == "bulwark.retry"]
    assert retry == [{"bulwark.provider": "alpha", "bulwark.delay_s": 0.0}]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [d for d in lines if d["msg"] == "upstream attempt failed"]
    assert failed
    assert failed[0]["trace_id"] == TRACE
    assert failed[0]["span_id"] == server.span_id


async def test_sampling_ratio_zero_follows_the_callers_decision(
        collector: Collector, sim: SimFactory, gateway: GatewayFactory) -> None:
    """parentbased_traceidratio with 0: a new trace is not recorded (nor invented for the
    upstream), nor one that a malformed `traceparent` starts; a caller's sampled trace is
    recorded, and an unsampled one passed on as is."""
    service = f"t-{uuid.uuid4().hex[:8]}"
    sims, gw = await two(sim, gateway, otel_env(
        collector, service, OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0"))
    assert (await chat(gw, {"model": "default", "messages": MSG}))[0] == 200
    assert (await chat(gw, {"model": "default", "messages": MSG},
                       {"traceparent": f"00-{TRACE}-{PARENT}-01"}))[0] == 200
    unsampled = "11111111111111111111111111111111"
    assert (await chat(gw, {"model": "default", "messages": MSG},
                       {"traceparent": f"00-{unsampled}-{PARENT}-00"}))[0] == 200
    assert (await chat(gw, {"model": "default", "messages": MSG},
                       {"traceparent": "garbage"}))[0] == 200
    got = await spans(collector, service, 2)
    assert {s.trace_id for s in got} == {TRACE}
    first, second, third, fourth = await sim_log(sims[0])
    assert "traceparent" not in fourth["headers"]
    assert "traceparent" not in first["headers"]
    assert second["headers"]["traceparent"].startswith(f"00-{TRACE}-")
    assert third["headers"]["traceparent"].startswith(f"00-{unsampled}-")
    assert int(third["headers"]["traceparent"].rsplit("-", 1)[1], 16) & 1 == 0


async def test_unusable_otel_values_fall_back_with_a_warning(
        collector: Collector, sim: SimFactory, gateway: GatewayFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    """Unknown sampler, bad ratio, unknown propagator and compression, negative batch delay,
    a malformed resource entry: warnings, the SDK's defaults, and traces still flow."""
    service = f"t-{uuid.uuid4().hex[:8]}"
    env = otel_env(collector, service, OTEL_TRACES_SAMPLER="bogus_sampler",
                   OTEL_TRACES_SAMPLER_ARG="lots", OTEL_PROPAGATORS="tracecontext,b3x",
                   OTEL_EXPORTER_OTLP_COMPRESSION="zstd", OTEL_BSP_SCHEDULE_DELAY="-5",
                   OTEL_RESOURCE_ATTRIBUTES="oops,deployment.environment=test")
    caplog.set_level(logging.WARNING, logger="bulwark.telemetry")
    tracing = telemetry.setup(env, service_name="x")
    assert tracing is not None
    assert isinstance(tracing.provider.sampler, ParentBased)
    tracing.shutdown()
    warned = " ".join(r.getMessage() for r in caplog.records)
    for word in ("bogus_sampler", "b3x", "zstd", "OTEL_BSP_SCHEDULE_DELAY", "oops"):
        assert word in warned
    env["OTEL_BSP_SCHEDULE_DELAY"] = "50"
    _, gw = await two(sim, gateway, env)
    assert (await chat(gw, {"model": "default", "messages": MSG},
                       {"traceparent": f"00-{TRACE}-{PARENT}-01"}))[0] == 200
    got = await spans(collector, service, 2)
    assert got[0].resource["deployment.environment"] == "test"


async def test_tracing_off_without_an_endpoint(sim: SimFactory, gateway: GatewayFactory) -> None:
    """No OTLP endpoint: no tracer, and no traceparent is invented for the upstream."""
    sims, gw = await two(sim, gateway, {"OTEL_SERVICE_NAME": "nothing"})
    assert gw.app[TRACING] is None
    assert (await chat(gw, {"model": "default", "messages": MSG},
                       {"traceparent": f"00-{TRACE}-{PARENT}-01"}))[0] == 200
    (seen,) = await sim_log(sims[0])
    assert "traceparent" not in seen["headers"]


async def test_a_collector_down_or_hanging_changes_nothing_for_clients(
        sim: SimFactory, gateway: GatewayFactory) -> None:
    """With the collector refusing connections, or accepting and never answering, every
    request (plain and streamed) is answered as without tracing."""
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(1)  # accepts into the backlog, never reads: an export hangs on it
    try:
        for endpoint in (f"http://127.0.0.1:{free_port()}",
                         f"http://127.0.0.1:{hanging.getsockname()[1]}"):
            _, gw = await two(sim, gateway, {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                             "OTEL_BSP_SCHEDULE_DELAY": "10",
                                             "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"})
            results = await asyncio.gather(*(
                chat(gw, {"model": "default", "messages": MSG, "stream": i % 2 == 1})
                for i in range(20)))
            assert [status for status, _ in results] == [200] * 20
            assert all(b"Hello from sim alpha" in body or b"Hello" in body
                       for _, body in results)
            assert all(body.endswith(b"data: [DONE]\n\n") for i, (_, body) in enumerate(results)
                       if i % 2 == 1)
    finally:
        hanging.close()


async def test_healthd_probes_are_traced(collector: Collector, sim: SimFactory, spawn: Spawn,
                                         pg_clean: str, db: asyncpg.Connection,
                                         tmp_path: Path) -> None:
    """healthd sends a span per probe to the collector, a failed one marked with its error."""
    alpha = await sim("alpha")
    await alpha.script(then={}, models_status=503)
    service = f"healthd-{uuid.uuid4().hex[:8]}"
    daemon = await spawn(pg_clean, write_providers(tmp_path / "p.toml", [alpha]),
                         HEALTHD_METRICS_PORT="0", **otel_env(collector, service))
    got = await spans(collector, service, 2)
    probe = got[0]
    assert probe.name == "health_check alpha"
    assert probe.attributes["bulwark.provider"] == "alpha"
    assert probe.attributes["error.type"] == "server_error"
    assert probe.status == ERROR
    assert await daemon.stop() == 0
