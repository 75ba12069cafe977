"""The OpenAPI document: generated from the code, complete, valid OpenAPI 3.1, and true of
a live formation (a real web process on Postgres, the simulator as its provider), which
schemathesis checks operation by operation."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path

import aiohttp
import msgspec
import pytest
import schemathesis
from aiohttp import web

from bulwark.config import Settings, sim_providers
from bulwark.feedback import FeedbackRequest
from bulwark.wire import ChatRequest
from service.app import create_app
from service.openapi import INTERNAL, build_document, describe, served_routes, undeclared
from tests.conftest import SimFactory
from tests.procs import Spawn, free_port, until, write_providers

pytestmark = pytest.mark.slow


def _app() -> web.Application:
    settings = Settings()
    return create_app(settings, sim_providers(settings))


def test_every_route_is_described() -> None:
    """Every route the app serves (but the implicit HEADs and INTERNAL) is in the document,
    with the method it is served under; nothing else is."""
    app = _app()
    assert undeclared(app) == []
    doc = build_document(app)
    served = {(m.lower(), p) for m, p, _ in served_routes(app)}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    # An exemption is a decision: it changes this line too. (The edge's 404/405 route.)
    assert frozenset({"/{_unrouted}"}) == INTERNAL
    for path in ("/v1/chat/completions", "/v1/models", "/v1/feedback", "/openapi.json",
                 "/health", "/health/live", "/health/ready", "/health/circuit-breakers"):
        assert path in doc["paths"], path


def test_a_route_without_declaration_is_reported() -> None:
    """A route added without `describe` shows up in `undeclared` (so the test above fails),
    and one added with it appears in the document at once."""
    app = _app()

    async def bare(request: web.Request) -> web.Response:
        return web.Response()

    @describe("Described", responses={200: None})
    async def told(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/bare", bare)
    app.router.add_post("/admin/things/{id}", told)
    assert undeclared(app) == [("GET", "/v1/bare")]
    op = build_document(app)["paths"]["/admin/things/{id}"]["post"]
    assert op["security"] == [{"adminToken": []}]
    assert {"name": "id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^[^{}/]+$"}} in op["parameters"]
    assert "401" in op["responses"]


def test_schemas_come_from_the_msgspec_types() -> None:
    """The request components are msgspec's own JSON Schema of the types the handlers
    decode (plus a type's declared cross-field rule), not a hand-kept copy."""
    doc = build_document(_app())
    schemas = doc["components"]["schemas"]
    _, own = msgspec.json.schema_components([ChatRequest, FeedbackRequest],
                                            ref_template="#/components/schemas/{name}")
    assert schemas["ChatRequest"] == own["ChatRequest"]
    assert schemas["FeedbackRequest"] == {**own["FeedbackRequest"],
                                          **FeedbackRequest.json_schema_extra}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    ok = chat["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert {"x-request-id", "x-bulwark-provider", "x-bulwark-attempts",
            "x-bulwark-fallback"} <= {h for h, d in ok["headers"].items() if d["required"]}
    assert chat["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}


def test_document_is_valid_openapi_3_1() -> None:
    """The document passes schemathesis's validation against the OpenAPI 3.1 meta-schema."""
    doc = build_document(_app())
    assert doc["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(doc).validate()


# -- the live formation ------------------------------------------------------------------

#: Per operation: the declared examples, the coverage phase's boundary and negative cases,
#: then this many fuzzed cases. Bounded so that the whole run stays well under a minute on
#: a busy two-core machine; a fixed seed makes a failure reproducible (the report prints it).
MAX_EXAMPLES = 20
SEED = os.environ.get("BULWARK_SCHEMATHESIS_SEED", "20261129")



#: Not run by schemathesis, which speaks plain HTTP: `/v1/ws` is a WebSocket upgrade
#: (tests/test_ws.py), and `/status/events` an endless event stream that no check can
#: read to its end (tests/test_status_page.py).
NOT_FUZZED = ("/v1/ws", "/status/events")
#: The admin writes run last, in a second pass: forcing the one provider open or setting
#: a severe degradation level makes every later chat a (declared, correct) 503, which the
#: no-5xx check would rightly refuse anywhere else.
ADMIN_WRITES = r"^/admin/"
#: Valid requests the gateway refuses by design, per operation (below):
#: the same Idempotency-Key with another body is a 422 (fuzzing reuses short keys), and a
#: job's callback_url is a 400 on a gateway without BULWARK_WEBHOOK_SECRET, as here.
SCHEMATHESIS_TOML = """
# 413 is a refusal too (an oversized body, e.g. more inputs than allowed).
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422",
                     "428", "429", "5xx"]

[auth.openapi.adminToken]
bearer = "{admin}"
[auth.openapi.clientKey]
bearer = "{client}"

[[operations]]
include-path = "/v1/chat/completions"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409",
                                                     "422", "429"]
[[operations]]
include-path = "/v1/chat/jobs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404",
                                                     "409", "422", "429"]
"""


async def _schemathesis(base: str, cwd: Path, *filters: str) -> str:
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
        "--checks", "all", "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--seed", SEED,
        # One worker: with two threads, CPython 3.11's ast.parse (hypothesis describes its
        # lambdas with it) can fail with "AST constructor recursion depth mismatch"
        # (CPython gh-106905), an error of the tool, not a finding.
        "--workers", "1",
        "--request-timeout", "20", "--suppress-health-check", "all",
        # Warnings are hints about test data (ids only a POST makes, links between
        # operations), not findings: every check still runs and fails the test.
        "--output-truncate", "true", "--warnings", "off", *filters, cwd=cwd,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(cli.communicate(), 300)
    report = out.decode(errors="replace")
    assert cli.returncode == 0, report
    assert "No issues found" in report, report
    return report


async def test_live_formation_conforms_to_the_document(
        pg_clean: str, sim: SimFactory, spawn: Spawn, tmp_path: Path) -> None:
    """schemathesis, run against a real web process (Postgres, the simulator as its
    provider, an admin token and a client key) from the document it serves, finds
    nothing: no 5xx, and every response conforms to the document (status, content type,
    headers, body and SSE events), with valid requests accepted and invalid ones refused."""
    alpha = await sim("alpha")
    port = free_port()
    admin = secrets.token_urlsafe(24)
    web = await spawn(pg_clean, write_providers(tmp_path / "providers.toml", [alpha]),
                      module="service", BULWARK_PORT=str(port), HTTP_BACKOFF_BASE_MS="0",
                      BULWARK_ADMIN_TOKEN=admin)
    base = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/health/live") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await until(ready, what="web process live")
    # A key from the start: the admin pass creates keys, and the first one turns
    # authentication on for /v1/*.
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}/admin/keys", json={"name": "schemathesis"},
            headers={"Authorization": f"Bearer {admin}"}) as r:
        assert r.status == 201, await r.text()
        client = (await r.json())["key"]
    (tmp_path / "schemathesis.toml").write_text(
        SCHEMATHESIS_TOML.format(admin=admin, client=client))
    skip = [a for path in NOT_FUZZED for a in ("--exclude-path", path)]
    await _schemathesis(base, tmp_path, *skip, "--exclude-path-regex", ADMIN_WRITES)
    await _schemathesis(base, tmp_path, "--include-path-regex", ADMIN_WRITES)
    await web.stop()
    log = web.output()
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log
