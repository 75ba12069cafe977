"""The classification table, row by row, and the client errors it leads to."""

from __future__ import annotations

import pytest

from bulwark.errors import (
    POLICY,
    C,
    DeadlineExceeded,
    ErrorClass,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamRejected,
    classify_status,
    final_error,
    parse_retry_after,
    redact,
)


@pytest.mark.parametrize(("status", "body", "cls"), [
    (429, '{"error": {"type": "rate_limit_exceeded"}}', C.RATE_LIMIT),
    (429, '{"error": {"code": "insufficient_quota"}}', C.QUOTA_EXCEEDED),
    (402, "", C.QUOTA_EXCEEDED),
    (401, "Incorrect API key", C.AUTHENTICATION),
    (403, "", C.PERMISSION),
    (403, "flagged by moderation", C.CONTENT_POLICY),
    (404, "model not found", C.NOT_FOUND),
    (408, "", C.TIMEOUT_TOTAL),
    (400, "bad field", C.BAD_REQUEST),
    (422, "", C.BAD_REQUEST),
    (400, "This model's maximum context length is 8192 tokens", C.CONTEXT_LENGTH),
    (413, "", C.CONTEXT_LENGTH),
    (400, '{"error": {"code": "content_filter"}}', C.CONTENT_POLICY),
    (500, "", C.SERVER_ERROR),
    (502, "", C.SERVER_ERROR),
    (503, "", C.SERVER_ERROR),
    (504, "", C.SERVER_ERROR),
    (529, "overloaded", C.SERVER_ERROR),
    (530, "<html>error code: 530</html>", C.SERVER_ERROR),
    (520, "<html>cloudflare</html>", C.SERVER_ERROR),
])
def test_classify_status(status: int, body: str, cls: ErrorClass) -> None:
    """Each upstream status (and body hint) maps to one class."""
    assert classify_status(status, body) is cls


def test_every_class_has_a_policy() -> None:
    """The table covers every class: nothing is classified without consequences."""
    assert set(POLICY) == set(ErrorClass)


@pytest.mark.parametrize("cls", [C.RATE_LIMIT, C.BAD_REQUEST, C.CONTENT_POLICY,
                                 C.CONTEXT_LENGTH, C.UNSUPPORTED])
def test_callers_errors_and_429_never_open_a_breaker(cls: ErrorClass) -> None:
    """A caller's own 400, a 429 and a content-policy refusal do not count against a breaker."""
    assert POLICY[cls].breaker is False


@pytest.mark.parametrize("cls", [C.BAD_REQUEST, C.CONTENT_POLICY])
def test_callers_errors_do_not_fail_over(cls: ErrorClass) -> None:
    """Another provider would refuse the caller's own bad request too: no failover."""
    assert POLICY[cls].failover is False
    assert POLICY[cls].client is UpstreamRejected


@pytest.mark.parametrize("cls", [C.NETWORK_REFUSED, C.NETWORK_DNS, C.NETWORK_TLS,
                                 C.TIMEOUT_CONNECT, C.TIMEOUT_FIRST_TOKEN, C.RATE_LIMIT])
def test_no_same_provider_retry_where_waiting_cannot_help(cls: ErrorClass) -> None:
    """Refused, DNS, TLS, connect timeouts, slow first token and 429 fail over at once."""
    assert POLICY[cls].retry is False
    assert POLICY[cls].failover is True


@pytest.mark.parametrize("cls", [C.SERVER_ERROR, C.NETWORK_RESET, C.MALFORMED_RESPONSE,
                                 C.TIMEOUT_IDLE])
def test_transient_failures_retry_and_count(cls: ErrorClass) -> None:
    """5xx, resets, malformed bodies and stalls are retried and count against the breaker."""
    assert POLICY[cls].retry is True
    assert POLICY[cls].breaker is True


@pytest.mark.parametrize("cls", [C.AUTHENTICATION, C.PERMISSION, C.QUOTA_EXCEEDED,
                                 C.NOT_FOUND])
def test_upstream_config_problems_are_503_for_the_client(cls: ErrorClass) -> None:
    """Our key refused upstream is not the client's fault: they see 503, the breaker opens."""
    assert POLICY[cls].client is ServiceUnavailable
    assert POLICY[cls].breaker is True


def test_retry_after_parsing_caps_and_prefers_ms() -> None:
    """retry-after-ms wins, delta seconds are read, dates are ignored, all capped."""
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}, 10) == 1.5
    assert parse_retry_after({"retry-after": "3"}, 10) == 3.0
    assert parse_retry_after({"retry-after": "600"}, 10) == 10.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 10) is None
    assert parse_retry_after({}, 10) is None


def test_final_error_all_rate_limited() -> None:
    """All 429s → 429 with the smallest Retry-After and x-should-retry false."""
    err = final_error([UpstreamError(C.RATE_LIMIT, retry_after=5),
                       UpstreamError(C.RATE_LIMIT, retry_after=2)], attempts=2,
                      deadline_passed=False)
    assert isinstance(err, RateLimited)
    assert err.headers() == {"Retry-After": "2", "x-should-retry": "false"}


def test_final_error_mixed_is_503_and_deadline_is_504() -> None:
    """Mixed failures → 503 with Retry-After; a passed deadline → 504."""
    failures = [UpstreamError(C.SERVER_ERROR), UpstreamError(C.RATE_LIMIT, retry_after=4)]
    err = final_error(failures, attempts=2, deadline_passed=False)
    assert isinstance(err, ServiceUnavailable)
    assert err.headers()["Retry-After"] == "4"
    assert isinstance(final_error(failures, attempts=2, deadline_passed=True), DeadlineExceeded)


def test_single_attempt_leaves_sdk_retry_alone() -> None:
    """With one attempt made, the gateway does not forbid the SDK's own retry."""
    err = final_error([UpstreamError(C.SERVER_ERROR)], attempts=1, deadline_passed=False)
    assert "x-should-retry" not in err.headers()


def test_redact_removes_keys_and_known_secrets() -> None:
    """Key-like strings and the configured secret values are removed from upstream text."""
    text = ("Incorrect API key provided: sk-proj-abcdef123456. key=hunter2hunter2 "
            "AIzaSyA1234567890abc")
    out = redact(text, ["hunter2hunter2"])
    assert "sk-proj" not in out and "hunter2" not in out and "AIza" not in out
