"""The health window: probe outcomes in, health out, with hysteresis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bulwark.state import Health
from healthd.scoring import HealthWindow, ScoringConfig

OK, FAIL = True, False


def feed(window: HealthWindow, outcomes: list[bool], latency_ms: float = 50.0) -> list[Health]:
    return [window.add(ok, latency_ms, None if ok else "server_error").health for ok in outcomes]


def test_unknown_before_any_sample() -> None:
    """A provider nobody has probed yet is UNKNOWN."""
    assert HealthWindow().health is Health.UNKNOWN


def test_first_good_probe_is_healthy() -> None:
    """One good, fast probe is enough to call a fresh provider healthy."""
    assert feed(HealthWindow(), [OK]) == [Health.HEALTHY]


def test_two_failures_in_a_row_make_it_unhealthy() -> None:
    """A healthy provider that starts failing is UNHEALTHY on its second failed probe."""
    window = HealthWindow()
    feed(window, [OK] * 5)
    assert feed(window, [FAIL, FAIL]) == [Health.DEGRADED, Health.UNHEALTHY]
    assert "2 probes failed in a row (server_error)" in window.verdict.reason


def test_single_blip_degrades_but_never_makes_unhealthy() -> None:
    """One failure among successes gives DEGRADED, and HEALTHY once it leaves the window."""
    window = HealthWindow()
    feed(window, [OK] * 5)
    states = feed(window, [FAIL, OK, OK, OK, OK, OK])
    assert Health.UNHEALTHY not in states
    assert states[:5] == [Health.DEGRADED] * 5
    assert states[5] is Health.HEALTHY


def test_recovers_after_two_good_probes() -> None:
    """After a whole window of failures, two successes in a row make it HEALTHY again."""
    window = HealthWindow()
    feed(window, [FAIL] * 5)
    assert window.health is Health.UNHEALTHY
    assert feed(window, [OK, OK]) == [Health.UNHEALTHY, Health.HEALTHY]
    assert window.samples == tuple(window.samples[-2:])


def test_one_success_between_failures_does_not_recover() -> None:
    """Alternating with failures, a single success never lifts UNHEALTHY."""
    window = HealthWindow()
    feed(window, [FAIL, FAIL])
    assert feed(window, [OK, FAIL, OK, FAIL]) == [Health.UNHEALTHY] * 4


def test_low_success_rate_is_unhealthy_without_a_streak() -> None:
    """Below a 50% success rate is UNHEALTHY even when failures never come two in a row."""
    window = HealthWindow()
    states = feed(window, [OK, FAIL, OK, FAIL, FAIL])
    assert states[-1] is Health.UNHEALTHY
    window = HealthWindow(ScoringConfig(fail_streak=3))
    assert feed(window, [FAIL, OK, FAIL, OK, FAIL])[-1] is Health.UNHEALTHY
    assert "40% of the last 5 probes" in window.verdict.reason


def test_first_failure_alone_is_only_degraded() -> None:
    """A single failed first probe is not yet proof of an outage."""
    assert feed(HealthWindow(), [FAIL]) == [Health.DEGRADED]


def test_slow_provider_is_degraded_with_a_recovery_band() -> None:
    """Mean latency over the limit degrades; it must fall below 75% of it to heal."""
    window = HealthWindow(ScoringConfig(window=2, slow_ms=1000.0))
    assert window.add(OK, 1500.0).health is Health.DEGRADED
    window.add(OK, 1500.0)
    # 900 ms is under the limit but inside the band: still degraded.
    window.add(OK, 900.0)
    assert window.add(OK, 900.0).health is Health.DEGRADED
    window.add(OK, 700.0)
    assert window.add(OK, 700.0).health is Health.HEALTHY


def test_failed_probes_do_not_count_towards_latency() -> None:
    """A slow timeout's latency is not held against the successful probes' mean."""
    window = HealthWindow(ScoringConfig(slow_ms=1000.0))
    feed(window, [OK] * 4, latency_ms=100.0)
    window.add(FAIL, 30_000.0, "timeout_total")
    assert "succeeded" in window.verdict.reason


@given(st.lists(st.booleans(), min_size=1, max_size=60))
def test_unhealthy_needs_two_failures_in_a_row_or_a_low_rate(outcomes: list[bool]) -> None:
    """Whatever the sequence, UNHEALTHY is only entered on a failure, and left only on the
    second success in a row."""
    window = HealthWindow()
    previous = window.health
    streak = 0
    for ok in outcomes:
        streak = streak + 1 if ok else 0
        now = window.add(ok, 10.0, None if ok else "server_error").health
        if now is Health.UNHEALTHY and previous is not Health.UNHEALTHY:
            assert not ok
        if previous is Health.UNHEALTHY and now is not Health.UNHEALTHY:
            assert streak == 2
        previous = now
