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


# -- jobs (`/v1/chat/jobs`, bulwark.jobstore.job_object) ----------------------------------

JobStatus = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]


class JobAccepted(msgspec.Struct, kw_only=True):
    """The 202 of `POST /v1/chat/jobs` and of a chat request queued by `Prefer:
    respond-async` (service.respond_async.accepted); `Location` says where to poll."""

    id: str
    object: Literal["chat.job"]
    status: JobStatus
    created_at: int


class Job(msgspec.Struct, kw_only=True):
    """A `chat.job` (CONTRACT "Durable chat jobs")."""

    id: str
    object: Literal["chat.job"]
    status: JobStatus
    model: str
    created_at: int
    updated_at: int
    attempts: int
    #: The provider of the last attempt; null before any.
    provider: str | None
    #: The caller's metadata, as given.
    metadata: dict[str, Any] | UnsetType = UNSET
    #: The chat completion, once succeeded.
    result: dict[str, Any] | UnsetType = UNSET
    #: Why it failed (the OpenAI error object), once failed or dead.
    error: ErrorDetail | UnsetType = UNSET
    #: How many times an operator put it back from the dead-letter queue; absent if never.
    replays: int | UnsetType = UNSET


class DeadJob(Job, kw_only=True):
    #: Unix seconds.
    dead_at: float


class DlqCounts(msgspec.Struct, kw_only=True):
    """`GET /health/dlq` (bulwark.jobstore.dlq_counts)."""

    dead: int
    queued: int
    running: int
    oldest_dead_age_sec: float | None


class DlqPage(DlqCounts, kw_only=True):
    """`GET /admin/reliability/dlq`: the counts, and dead jobs oldest first."""

    jobs: list[DeadJob]


class DlqRequeued(msgspec.Struct, kw_only=True):
    id: str
    status: Literal["queued"]


class DlqPurged(msgspec.Struct, kw_only=True):
    purged: int


# -- admin: breakers and degradation --------------------------------------------------------


class Forced(msgspec.Struct, kw_only=True):
    """An operator's force-open (fleet row `breaker/forced/<provider>`)."""

    reason: str
    since: float
    expires_at: float | None
    #: "<operator>@<address>".
    by: str


class AdminBreaker(msgspec.Struct, kw_only=True):
    provider: str
    #: The fleet's state (the shared row), or this process's while there is none.
    breaker: Literal["closed", "open", "half_open"]
    health: str
    reason: str
    updated_by: str
    open_for: float | None
    forced: Forced | None
    #: This process's own breaker.
    local: BreakerSnapshot


class AdminBreakerList(msgspec.Struct, kw_only=True):
    breakers: list[AdminBreaker]
    #: This process's view is in step with Postgres.
    synced: bool


class BreakerChanged(msgspec.Struct, kw_only=True):
    provider: str
    breaker: Literal["open", "closed"]
    forced: Forced | None


DegradationLevel = Literal["normal", "minor", "moderate", "severe", "critical"]


class OperatorDegradation(msgspec.Struct, kw_only=True):
    """An operator's override (fleet row `degradation/operator`)."""

    level: DegradationLevel
    reason: str
    since: float
    expires_at: float | None
    by: str


class AutoDegradation(msgspec.Struct, kw_only=True):
    """healthd's computed level (fleet row `degradation/auto`)."""

    level: DegradationLevel
    reason: str
    since: float


class DegradationSet(OperatorDegradation, kw_only=True):
    source: Literal["operator"]


class DegradationCleared(msgspec.Struct, kw_only=True):
    source: Literal["auto"]
    operator: None


class DegradationStatus(msgspec.Struct, kw_only=True):
    """`GET /health/degradation` (bulwark.degradation.Status): the level in force, where it
    comes from (healthd or an operator), why, since and until when (Unix seconds)."""

    level: DegradationLevel
    source: Literal["auto", "operator"]
    reason: str
    since: float | None
    expires_at: float | None


class DegradationState(DegradationStatus, kw_only=True):
    """The level in force, and both rows it comes from, as this process holds them."""

    operator: OperatorDegradation | None
    auto: AutoDegradation | None


class ReliabilityReport(msgspec.Struct, kw_only=True):
    """`bulwark.report.reliability_report`, as `python -m healthd report --json` prints it."""

    since: float
    until: float
    window_sec: float
    #: Per provider: availability, probes, outages, failures by class, …
    providers: dict[str, dict[str, Any]]
    unrouted_failures_by_class: dict[str, int]
    #: Null when this database has no record of fallbacks (see `notes`).
    fallbacks_by_kind: dict[str, int] | None
    notes: list[str] | UnsetType = UNSET


# -- admin: client keys -----------------------------------------------------------------------


class ClientKey(msgspec.Struct, kw_only=True):
    """A key's public record (bulwark.clientkeys.public): never the key, never its hash."""

    id: str
    name: str
    rpm: int | None
    tpm: int | None
    #: The models this key may use; null: every model.
    models: list[str] | None
    revoked: bool
    #: Unix seconds; null: never expires.
    expires_at: float | None
    created_at: float | None


class ClientKeyListed(ClientKey, kw_only=True):
    #: This process holds the record (and so enforces it).
    loaded: bool


class ClientKeyList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ClientKeyListed]


class ClientKeyCreated(ClientKey, kw_only=True):
    #: The key itself: shown this once, stored nowhere.
    key: str
