"""Retry policy: only retryable classes, bounded by attempts and deadline, full jitter."""

from __future__ import annotations

import random

from bulwark.errors import C, UpstreamError
from bulwark.retry import Backoff, retry_delay

B = Backoff(base_sec=0.2, cap_sec=2.0)


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    """Delays are uniform in [0, min(cap, base·2^n)]: spread out, never above the ceiling."""
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.6), (4, 2.0), (10, 2.0)]:
        delays = [B.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter uses the whole range
        assert min(delays) < ceiling * 0.2


def test_only_retryable_classes_retry() -> None:
    """A 5xx retries; a refused connection or a 429 moves on at once."""
    kw = {"attempt": 0, "retries": 2, "backoff": B, "time_left": 30.0}
    assert retry_delay(UpstreamError(C.SERVER_ERROR), **kw) is not None  # type: ignore[arg-type]
    assert retry_delay(UpstreamError(C.NETWORK_REFUSED), **kw) is None  # type: ignore[arg-type]
    assert retry_delay(UpstreamError(C.RATE_LIMIT, retry_after=1), **kw) is None  # type: ignore[arg-type]


def test_attempts_bound_retries() -> None:
    """No retry once the provider's retries are spent."""
    err = UpstreamError(C.SERVER_ERROR)
    assert retry_delay(err, attempt=1, retries=2, backoff=B, time_left=30) is not None
    assert retry_delay(err, attempt=2, retries=2, backoff=B, time_left=30) is None
    assert retry_delay(err, attempt=0, retries=0, backoff=B, time_left=30) is None


def test_retry_after_replaces_backoff_and_deadline_bounds_it() -> None:
    """An upstream's Retry-After is the wait; a wait past the deadline means move on."""
    err = UpstreamError(C.SERVER_ERROR, retry_after=1.5)
    assert retry_delay(err, attempt=0, retries=2, backoff=B, time_left=30) == 1.5
    assert retry_delay(err, attempt=0, retries=2, backoff=B, time_left=1.0) is None


def test_long_retry_after_fails_over_instead_of_waiting() -> None:
    """A 503 asking for 60 s is not waited for: the next provider is tried now."""
    err = UpstreamError(C.SERVER_ERROR, retry_after=60)
    assert retry_delay(err, attempt=0, retries=2, backoff=B, time_left=120) is None


def test_zero_base_turns_sleeping_off() -> None:
    """HTTP_BACKOFF_BASE_MS=0 retries at once (what tests use)."""
    err = UpstreamError(C.SERVER_ERROR)
    assert retry_delay(err, attempt=0, retries=2, backoff=Backoff(base_sec=0), time_left=5) == 0
