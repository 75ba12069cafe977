"""Logging set-up shared by the web process and healthd: one handler on stderr.

`LOG_FORMAT=json` (the default) writes one JSON object per line — ``ts``, ``level``,
``logger``, ``msg``, then whatever the call passed in ``extra`` (``provider``,
``transition``, ``reason``, …) — for a log shipper; ``text`` writes the same on one
human-readable line. Both formatters redact before writing: the values of the providers'
API-key variables, and anything `bulwark.errors.redact` recognises as a credential. Secrets
must never reach a log line, whoever wrote the message (CONTRACT). A line written inside a
traced request carries its ``trace_id`` and ``span_id`` (when tracing is on).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Literal, TextIO

import msgspec

from bulwark.config import Provider
from bulwark.errors import redact

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}

#: A secret this short cannot be told apart from ordinary text: replacing every "ab" in
#: every line would make logs unreadable while protecting nothing a real key looks like.
_MIN_SECRET_LEN: Final = 4

_encoder = msgspec.json.Encoder(enc_hook=str)

#: Set by `bulwark.telemetry.setup` when tracing is on: the current trace and span ids (hex),
#: or None outside a trace. While it is None, log lines cost nothing extra.
trace_ids: Callable[[], tuple[str, str] | None] | None = None


def provider_secrets(providers: Iterable[Provider],
                     env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The values of every environment variable a provider names in `api_key_env`."""
    source = os.environ if env is None else env
    values = {source.get(p.api_key_env, "") for p in providers if p.api_key_env}
    return tuple(sorted(v for v in values if len(v) >= _MIN_SECRET_LEN))


class _Redacting(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Also redact these values from now on (providers are loaded after logging starts)."""
        fresh = {s for s in secrets if len(s) >= _MIN_SECRET_LEN}
        # Longest first, so that a secret containing another is replaced whole.
        self.secrets = tuple(sorted(fresh | set(self.secrets), key=len, reverse=True))

    def clean(self, text: str) -> str:
        return redact(text, self.secrets)

    def extras(self, record: logging.LogRecord) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            out[key] = self._clean_value(value)
        if trace_ids is not None and (ids := trace_ids()) is not None:
            out["trace_id"], out["span_id"] = ids
        return out

    def _clean_value(self, value: object) -> object:
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self.clean(str(value))

    def exception_text(self, record: logging.LogRecord) -> str | None:
        if record.exc_info:
            return self.clean(self.formatException(record.exc_info))
        if record.exc_text:
            return self.clean(record.exc_text)
        return None


def _timestamp(created: float) -> str:
    stamp = dt.datetime.fromtimestamp(created, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(_Redacting):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": self.clean(record.getMessage()),
        }
        for key, value in self.extras(record).items():
            doc.setdefault(key, value)
        exc = self.exception_text(record)
        if exc is not None:
            doc["exc"] = exc
        return _encoder.encode(doc).decode()


class TextFormatter(_Redacting):
    """``ts level logger: msg key=value …`` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_timestamp(record.created)} {record.levelname:<7} {record.name}: "
                f"{self.clean(record.getMessage())}")
        fields = " ".join(f"{k}={v}" for k, v in self.extras(record).items())
        if fields:
            line = f"{line} {fields}"
        exc = self.exception_text(record)
        if exc is not None:
            line = f"{line}\n{exc}"
        return line


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a NUL in a header, a broken chunked body)
    as an ERROR with a traceback, then answers 400 itself. It is the client's mistake, and
    a way for anyone to flood our error logs: one INFO line instead, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 400) < 500:
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "malformed request refused with %s: %s", (
            exc.code, " ".join(str(exc.message).split())[:200])
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def setup_logging(level: str = "INFO", fmt: Literal["json", "text"] = "json", *,
                  secrets: Iterable[str] = (), stream: TextIO | None = None) -> logging.Handler:
    """Route every logger to one stderr handler; idempotent (replaces our earlier handler)."""
    formatter: _Redacting = TextFormatter(secrets) if fmt == "text" else JsonFormatter(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.set_name("bulwark")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "bulwark":
            root.removeHandler(old)
    root.addHandler(handler)
    server = logging.getLogger("aiohttp.server")
    for f in list(server.filters):
        if isinstance(f, _MalformedRequests):
            server.removeFilter(f)
    server.addFilter(_MalformedRequests())
    # An unknown LOG_LEVEL falls back to INFO rather than refusing to start over a typo.
    root.setLevel(logging.getLevelNamesMapping().get(level.upper(), logging.INFO))
    return handler


def add_secrets(secrets: Iterable[str]) -> None:
    """Teach the installed handler more values to redact (e.g. once providers are loaded)."""
    values = tuple(secrets)
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "bulwark" and isinstance(handler.formatter, _Redacting):
            handler.formatter.add_secrets(values)
