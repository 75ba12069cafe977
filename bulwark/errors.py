"""Errors: what the client sees, and the one table that classifies upstream failures.

Client-facing errors (rendered by one middleware as OpenAI-shaped JSON, or as a final SSE
error event once a stream has started)::

    GatewayError                      status  type
    ├── InvalidRequest                400     invalid_request_error
    │   └── UpstreamRejected          400     invalid_request_error (bad_request, context_length,
    │                                                                content_policy upstream)
    ├── AuthenticationFailed          401     authentication_error
    ├── PermissionDenied              403     permission_error
    ├── NotFound                      404     invalid_request_error (model_not_found, not_found)
    ├── Conflict                      409     invalid_request_error (idempotency key in use,
    │                                                                job not cancellable)
    ├── PayloadTooLarge               413     invalid_request_error
    ├── Unprocessable                 422     invalid_request_error (idempotency key reused)
    ├── RateLimited                   429     rate_limit_error      + Retry-After
    ├── BadGateway                    502     api_error
    ├── ServiceUnavailable            503     api_error             + Retry-After
    └── DeadlineExceeded              504     timeout_error

Upstream failures are `UpstreamError(cls=ErrorClass…)`, raised only by provider adapters
(the boundary where foreign exceptions are translated) and never rendered as they are: the
router looks the class up in `POLICY` to decide retry / breaker / failover, and turns what
is left at the end into one of the client errors above. An upstream's status line, body or
headers never reach the client.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from typing import ClassVar, Final

import msgspec


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.retry_after = retry_after
        #: False once the gateway has retried or failed over itself (CONTRACT: x-should-retry).
        self.should_retry = should_retry

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.retry_after is not None:
            # Delta seconds, never a date: immune to clock skew (FACTS), rounded up so that a
            # client honouring it does not come back a moment too early.
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        return out


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class UpstreamRejected(InvalidRequest):
    default_code = "upstream_rejected"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class Unprocessable(GatewayError):
    status = 422
    type = "invalid_request_error"
    default_code = "unprocessable"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class BadGateway(GatewayError):
    status = 502
    type = "api_error"
    default_code = "upstream_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "api_error"
    default_code = "no_provider_available"


class DeadlineExceeded(GatewayError):
    status = 504
    type = "timeout_error"
    default_code = "deadline_exceeded"


class ErrorClass(enum.StrEnum):
    RATE_LIMIT = "rate_limit"
    QUOTA_EXCEEDED = "quota_exceeded"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED = "unsupported"
    CONTEXT_LENGTH = "context_length"
    CONTENT_POLICY = "content_policy"
    TIMEOUT_CONNECT = "timeout_connect"
    TIMEOUT_FIRST_TOKEN = "timeout_first_token"
    TIMEOUT_IDLE = "timeout_idle"
    TIMEOUT_TOTAL = "timeout_total"
    NETWORK_REFUSED = "network_refused"
    NETWORK_RESET = "network_reset"
    NETWORK_DNS = "network_dns"
    NETWORK_TLS = "network_tls"
    SERVER_ERROR = "server_error"
    MALFORMED_RESPONSE = "malformed_response"


class Policy(msgspec.Struct, frozen=True):
    """What one class of upstream failure means."""

    retry: bool  # try the same provider again (with backoff) before moving on
    breaker: bool  # counts as a failure in the provider's breaker
    failover: bool  # the next provider may answer instead
    client: type[GatewayError]  # what the client sees if this is where it ends
    code: str


C = ErrorClass
#: The one classification table (DESIGN principle 5). Rationale per row:
#: - 429 is the provider protecting itself, not failing: skip it now (fail over), honour its
#:   Retry-After for later requests, never count it against the breaker.
#: - auth/permission/quota/not_found at the upstream are *our* configuration problems: the
#:   client is not at fault, so they end as 503, and they open the breaker (the provider is
#:   unusable until someone acts).
#: - A caller's own bad request and a content-policy refusal are the caller's: no retry, no
#:   failover (another provider would refuse too), no breaker. Context length may fit another
#:   provider's window, so it fails over, but still never counts against the breaker; so
#:   does a feature one provider kind cannot translate (n > 1 on Anthropic, say).
#: - A refused connection or DNS/TLS failure will not heal in 200 ms: fail over with no
#:   backoff. A reset, a 5xx, a truncated or malformed body often are transient: retry.
#: - Timeouts count against the breaker (slow is broken for a chat user). A slow first
#:   token is not retried on the same provider: it would spend the deadline twice.
POLICY: Final[Mapping[ErrorClass, Policy]] = {
    C.RATE_LIMIT: Policy(False, False, True, RateLimited, "rate_limit_exceeded"),
    C.QUOTA_EXCEEDED: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.AUTHENTICATION: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.PERMISSION: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.NOT_FOUND: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.BAD_REQUEST: Policy(False, False, False, UpstreamRejected, "invalid_request"),
    C.UNSUPPORTED: Policy(False, False, True, UpstreamRejected, "unsupported_parameter"),
    C.CONTEXT_LENGTH: Policy(False, False, True, UpstreamRejected, "context_length_exceeded"),
    C.CONTENT_POLICY: Policy(False, False, False, UpstreamRejected, "content_filter"),
    C.TIMEOUT_CONNECT: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.TIMEOUT_FIRST_TOKEN: Policy(False, True, True, DeadlineExceeded, "upstream_timeout"),
    C.TIMEOUT_IDLE: Policy(True, True, True, DeadlineExceeded, "upstream_stream_stalled"),
    C.TIMEOUT_TOTAL: Policy(False, True, True, DeadlineExceeded, "upstream_timeout"),
    C.NETWORK_REFUSED: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.NETWORK_RESET: Policy(True, True, True, ServiceUnavailable, "no_provider_available"),
    C.NETWORK_DNS: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.NETWORK_TLS: Policy(False, True, True, ServiceUnavailable, "no_provider_available"),
    C.SERVER_ERROR: Policy(True, True, True, ServiceUnavailable, "no_provider_available"),
    C.MALFORMED_RESPONSE: Policy(True, True, True, BadGateway, "upstream_malformed_response"),
}


class UpstreamError(Exception):
    """One failed upstream attempt, classified. Internal: never shown to a client as is."""

    def __init__(
        self,
        cls: ErrorClass,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        detail: str = "",
        client_message: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(f"{cls}: {detail}" if detail else str(cls))
        self.cls = cls
        self.status = status
        self.retry_after = retry_after
        #: Sanitised context for logs and error rows; never sent to a client.
        self.detail = detail[:300]
        #: For the caller's own errors (400, context length): a redacted upstream message.
        self.client_message = client_message
        self.param = param

    @property
    def policy(self) -> Policy:
        return POLICY[self.cls]


_QUOTA_HINTS = ("insufficient_quota", "quota", "billing", "credit")
_CONTEXT_HINTS = ("context_length", "context length", "maximum context", "too many tokens",
                  "prompt is too long", "token limit")
_POLICY_HINTS = ("content_policy", "content_filter", "safety", "moderation", "flagged")


def classify_status(status: int, text: str = "") -> ErrorClass:
    """Map an upstream HTTP status (plus hints in its body) to a class. `text` is lowercased."""
    low = text.lower()
    if status == 429:
        return C.QUOTA_EXCEEDED if any(h in low for h in _QUOTA_HINTS) else C.RATE_LIMIT
    if status == 402:
        return C.QUOTA_EXCEEDED
    if status == 401:
        return C.AUTHENTICATION
    if status == 403:
        return C.CONTENT_POLICY if any(h in low for h in _POLICY_HINTS) else C.PERMISSION
    if status == 404:
        return C.NOT_FOUND
    if status == 408:
        return C.TIMEOUT_TOTAL
    if status == 413 or any(h in low for h in _CONTEXT_HINTS):
        return C.CONTEXT_LENGTH
    if status in (400, 422):
        return C.CONTENT_POLICY if any(h in low for h in _POLICY_HINTS) else C.BAD_REQUEST
    if status >= 500:
        # 5xx includes Cloudflare's 520-530 family, whose body is an HTML page.
        return C.SERVER_ERROR
    return C.MALFORMED_RESPONSE


def parse_retry_after(headers: Mapping[str, str], cap: float) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta seconds), capped.

    HTTP-date values are ignored on purpose: they depend on clocks agreeing (FACTS).
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return min(max(float(raw_ms) / 1000.0, 0.0), cap)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return min(max(float(raw), 0.0), cap)
        except ValueError:
            return None
    return None


# Credentials, not prose. Three shapes:
# - opaque keys recognisable on their own (OpenAI `sk-…`, Google `AIza…`, any run of 32+
#   key characters), so a provider's "Incorrect API key sk-ab…cd" hint cannot travel on;
# - a value after a label that names a secret outright (password, secret): whatever it is;
# - a value after `key`/`token` labels (`api_key=`, `x-api-key:`, `"access_token": "…"`) or
#   `Bearer`: only when it looks like a credential — 8+ key characters with a digit, or 20+;
#   with a mere space after the label, only letters and digits mixed ("invalid key Ab12cd34"),
#   so "no first token in time" and "max tokens 4096" stay readable.
_KEYCHARS = r"[A-Za-z0-9._~+/=\-]"
_CREDENTIAL = rf"(?:(?={_KEYCHARS}*\d){_KEYCHARS}{{8,}}|{_KEYCHARS}{{20,}})"
_OPAQUE = re.compile(r"sk-[A-Za-z0-9_\-*.]{4,}|AIza[0-9A-Za-z_\-]{10,}|[A-Za-z0-9_\-]{32,}")
_SECRET_LABEL = re.compile(
    r"(?P<label>\b(?:[a-z]+[_-])?(?:password|passwd|pwd|secret)s?\b[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<value>[^\s\"',;]+)",
    re.IGNORECASE,
)
_KEY = r"\b(?:[a-z]+[_-])?(?:api[_-]?key|apikey|key|token)s?\b"
_KEY_LABEL = re.compile(
    rf"(?P<label>\bbearer\s+|{_KEY}[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?)"
    rf"(?P<value>{_CREDENTIAL})",
    re.IGNORECASE,
)
# "invalid key AbCd1234": without `=`/`:` only a value with both letters and digits counts.
_KEY_SPACED = re.compile(
    rf"(?P<label>{_KEY}\s+)(?P<value>(?={_KEYCHARS}*[A-Za-z])(?={_KEYCHARS}*\d){_KEYCHARS}{{8,}})",
    re.IGNORECASE,
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _SECRET_LABEL.sub(r"\g<label>[redacted]", text)
    text = _KEY_LABEL.sub(r"\g<label>[redacted]", text)
    text = _KEY_SPACED.sub(r"\g<label>[redacted]", text)
    return _OPAQUE.sub("[redacted]", text)


def final_error(failures: list[UpstreamError], *, attempts: int,
                deadline_passed: bool) -> GatewayError:
    """What the client sees when no provider could answer.

    All rate limited → 429 with the smallest Retry-After; deadline passed → 504; otherwise
    503 with Retry-After. Never any upstream text.
    """
    should_retry = False if attempts > 1 else None
    if deadline_passed:
        return DeadlineExceeded(
            "The request's deadline passed before a provider answered.",
            code="deadline_exceeded", should_retry=should_retry,
        )
    if failures and all(f.cls is C.RATE_LIMIT for f in failures):
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        return RateLimited(
            "Every provider for this model is rate limited; retry after the delay given.",
            retry_after=min(waits) if waits else 1.0, should_retry=should_retry,
        )
    if failures and all(f.cls is C.MALFORMED_RESPONSE for f in failures):
        return BadGateway(
            "The providers for this model returned invalid responses.",
            code="upstream_malformed_response", should_retry=should_retry,
        )
    return ServiceUnavailable(
        "No provider can answer this model right now; retry after the delay given.",
        retry_after=min((f.retry_after for f in failures if f.retry_after), default=2.0),
        should_retry=should_retry,
    )
