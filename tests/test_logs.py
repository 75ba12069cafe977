"""Log lines: structured JSON (or text) on one handler, never carrying a secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from bulwark.config import ProviderConfig, Settings, resolve
from bulwark.logs import add_secrets, provider_secrets, setup_logging
from tests.pg import eventually

SECRET = "alpha-secret-value-1234"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_line_has_the_fields_and_extras(restore_root: None) -> None:
    """A JSON line carries ts, level, logger, msg and the extra fields given."""
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    logging.getLogger("healthd").warning("health %s", "down", extra={
        "provider": "alpha", "transition": "healthy->unhealthy", "reason": "2 failed",
        "term": 3})
    doc = json.loads(out.getvalue())
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "healthd"
    assert doc["msg"] == "health down"
    assert doc["ts"].endswith("Z")
    assert (doc["provider"], doc["transition"], doc["reason"], doc["term"]) == (
        "alpha", "healthy->unhealthy", "2 failed", 3)


def test_secrets_are_redacted_everywhere(restore_root: None) -> None:
    """A provider key never appears: not in the message, the extras or a traceback."""
    out = io.StringIO()
    setup_logging("DEBUG", "json", secrets=[SECRET], stream=out)
    log = logging.getLogger("test")
    log.info("calling with %s", SECRET, extra={"reason": f"auth {SECRET} refused"})
    try:
        raise ValueError(f"bad key {SECRET}")
    except ValueError:
        log.exception("failed")
    log.info("header was Authorization: Bearer sk-abcdefghijklmnop")
    text = out.getvalue()
    assert SECRET not in text
    assert "sk-abcdefghijklmnop" not in text
    assert text.count("[redacted]") >= 4
    for line in text.splitlines():
        json.loads(line)


def test_text_format_and_late_secrets(restore_root: None) -> None:
    """The text format is one line with key=value extras; secrets added later are redacted."""
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    add_secrets([SECRET])
    logging.getLogger("healthd").info("key is %s", SECRET, extra={"provider": "alpha"})
    line = out.getvalue().strip()
    assert SECRET not in line
    assert "healthd: " in line
    assert line.endswith("provider=alpha")


def test_level_filters_and_setup_is_idempotent(restore_root: None) -> None:
    """Calling setup twice leaves one handler; records below the level are dropped."""
    out = io.StringIO()
    setup_logging("INFO", "json", stream=io.StringIO())
    setup_logging("warning", "json", stream=out)
    assert sum(h.get_name() == "bulwark" for h in logging.getLogger().handlers) == 1
    logging.getLogger("x").info("quiet")
    assert out.getvalue() == ""


def test_provider_secrets_reads_the_named_variables() -> None:
    """Secrets are the values of the variables providers name; unset or tiny ones are skipped."""
    cfgs = [ProviderConfig(name=n, kind="openai", base_url="http://x/v1", api_key_env=var,
                           models={"m": "m"})
            for n, var in [("a", "A_KEY"), ("b", "B_KEY"), ("c", "C_KEY"), ("d", None)]]
    providers = [resolve(c, Settings()) for c in cfgs]
    env = {"A_KEY": SECRET, "B_KEY": "xy"}
    assert provider_secrets(providers, env) == (SECRET,)


async def test_a_malformed_request_is_one_info_line(restore_root: None,
                                                     aiohttp_server: Any) -> None:
    """A request aiohttp cannot parse (a NUL in a header) is answered 400 and logged as one
    INFO line without a traceback, not as an ERROR anyone could flood the logs with."""
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    server = await aiohttp_server(web.Application())
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Probe: \x00\r\n\r\n")
    status = await reader.readline()
    writer.close()
    assert b" 400 " in status
    await eventually(lambda: "malformed request" in out.getvalue())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    refused = [d for d in lines if d["logger"] == "aiohttp.server"]
    assert [d["level"] for d in refused] == ["INFO"]
    assert "exc" not in refused[0]
    assert refused[0]["msg"].startswith("malformed request refused with 400")
@pytest.mark.parametrize("prose", [
    "no first token in time",
    "max tokens 4096 exceeded for this model",
    "the key to a fast answer is a warm pool",
    "token: none received before the deadline",
    "bearer token expired",
    "key=value pairs are ignored",
    "stream ended without finish_reason",
])
def test_prose_about_tokens_and_keys_is_not_redacted(restore_root: None, prose: str) -> None:
    """Ordinary words after "token" or "key" reach the log line unchanged."""
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out)
    logging.getLogger("bulwark.dispatch").warning(prose, extra={"detail": prose})
    doc = json.loads(out.getvalue())
    assert doc["msg"] == prose
    assert doc["detail"] == prose


@pytest.mark.parametrize(("line", "secret"), [
    ("api_key=abcd1234efgh", "abcd1234efgh"),
    ("token: 9f8e7d6c5b4a3210", "9f8e7d6c5b4a3210"),
    ("Authorization: Bearer eyJhbGciOi.abc.def1", "eyJhbGciOi.abc.def1"),
    ("x-api-key: ant-abc-12345678", "ant-abc-12345678"),
    ('{"access_token": "ya29.a0AfH6SMC"}', "ya29.a0AfH6SMC"),
    ("password=hunter2", "hunter2"),
    ("HTTP 401: invalid key ABCDEFGH12", "ABCDEFGH12"),
    ("Incorrect API key provided: sk-proj-ab12**cd", "sk-proj-ab12"),
    ("secret AIzaSyA1234567890abcdef", "AIzaSyA1234567890abcdef"),
])
def test_credentials_are_redacted_keeping_the_label(restore_root: None, line: str,
                                                     secret: str) -> None:
    """A credential after a label, or one recognisable on its own, is replaced."""
    out = io.StringIO()
    setup_logging("INFO", "text", stream=out)
    logging.getLogger("bulwark.dispatch").warning(line)
    text = out.getvalue()
    assert secret not in text
    assert "[redacted]" in text
