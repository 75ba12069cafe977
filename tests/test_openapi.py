"""The OpenAPI document: generated from the code, complete, valid OpenAPI 3.1, and true of
a live formation (a real web process on Postgres, the simulator as its provider), which
schemathesis checks operation by operation."""

from __future__ import annotations

import asyncio
import os
import socket
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
from tests.procs import Spawn, until, write_providers

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
    assert frozenset() == INTERNAL  # an exemption is a decision: it changes this line too
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_live_formation_conforms_to_the_document(
        pg_clean: str, sim: SimFactory, spawn: Spawn, tmp_path: Path) -> None:
    """schemathesis, run against a real web process (Postgres, the simulator as its
    provider) from the document it serves, finds nothing: no 5xx, and every response
    conforms to the document (status, content type, headers, body and SSE events), with
    valid requests accepted and invalid ones refused."""
    alpha = await sim("alpha")
    port = _free_port()
    web = await spawn(pg_clean, write_providers(tmp_path / "providers.toml", [alpha]),
                      module="service", BULWARK_PORT=str(port), HTTP_BACKOFF_BASE_MS="0")
    base = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{base}/health/live") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    await until(ready, what="web process live")
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
        "--checks", "all", "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES), "--seed", SEED, "--workers", "2",
        "--request-timeout", "20", "--suppress-health-check", "all",
        "--output-truncate", "true", cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(cli.communicate(), 300)
    report = out.decode(errors="replace")
    assert cli.returncode == 0, report
    assert "No issues found" in report, report
    await web.stop()
    log = web.output()
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log
