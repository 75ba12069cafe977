"""The gateway's own response bodies as msgspec types, for the OpenAPI document.

The chat wire types live in `bulwark/wire.py`; these are the rest: the OpenAI error shape
that `bulwark.errors.GatewayError.body()` renders, and the health endpoints' bodies.
Response types are open (no `forbid_unknown_fields`): a field added later does not make
older documents wrong. The schemathesis run in tests/test_openapi.py checks every response
against them, so a handler that drifts from its type fails the suite.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    #: invalid_request_error, authentication_error, permission_error, rate_limit_error,
    #: api_error, timeout_error (docs/ERRORS.md).
    type: str
    code: str | None
    #: The request field at fault, when there is one (`messages[0].role`, `rating`).
    param: str | None


class ErrorBody(msgspec.Struct, kw_only=True):
    """OpenAI's error shape; the openai SDKs raise their usual classes on it."""

    error: ErrorDetail


HealthStatus = Literal["pass", "warn", "fail"]


class HealthCheck(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """One measurement of a component (draft-inadarei-api-health-check)."""

    status: HealthStatus
    observed_value: Any = UNSET
    observed_unit: str | UnsetType = UNSET
    output: str | UnsetType = UNSET


class HealthBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`application/health+json`: pass, warn (serving on local state only) or fail."""

    status: HealthStatus
    #: Keyed "component:measurement" (`providers:available`, `healthd:heartbeat_age`).
    checks: dict[str, list[HealthCheck]] | UnsetType = UNSET


class BreakerSnapshot(msgspec.Struct, kw_only=True):
    """This process's breaker of one provider (`bulwark.breaker.Breaker.snapshot`)."""

    name: str
    state: Literal["closed", "open", "half_open"]
    failure_rate: float
    slow_call_rate: float
    calls_in_window: int
    failures_in_window: int
    slow_calls_in_window: int
    consecutive_failures: int
    trips: int
    #: Seconds until an open breaker lets a trial call through; 0 unless open.
    retry_in: float
    half_open_in_flight: int


class BreakerList(msgspec.Struct, kw_only=True):
    breakers: dict[str, BreakerSnapshot]
