"""The circuit breaker state machine, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import logging

import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from bulwark.breaker import (
    TRANSITIONS,
    Breaker,
    BreakerConfig,
    IllegalTransition,
    State,
    Transition,
    check_transition,
)
from bulwark.config import Settings


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A breaker with a fake clock and a log of every transition it reported."""

    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.clock = FakeClock()
        self.events: list[Transition] = []
        self.breaker = Breaker(
            "alpha",
            config or BreakerConfig(),
            clock=self.clock,
            on_transition=self.events.append,
        )

    def moves(self) -> list[tuple[State, State, str]]:
        return [(e.from_state, e.to_state, e.source) for e in self.events]


def state_of(breaker: Breaker) -> State:
    """The state, read through a call so that mypy does not narrow it across actions."""
    return breaker.state


def trip(h: Harness) -> None:
    """Open the breaker through its own calls (consecutive failures)."""
    for _ in range(h.breaker.config.consecutive_failures):
        h.breaker.record_failure(reason="http_503")
    assert state_of(h.breaker) is State.OPEN


# -- the table ---------------------------------------------------------------------------------


def test_transition_table_is_the_expected_one() -> None:
    """The legal moves are exactly the five edges of the classic breaker."""
    c, o, h = State.CLOSED, State.OPEN, State.HALF_OPEN
    assert {(c, o), (o, h), (o, c), (h, o), (h, c)} == TRANSITIONS


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (State.CLOSED, State.HALF_OPEN),
        (State.CLOSED, State.CLOSED),
        (State.OPEN, State.OPEN),
        (State.HALF_OPEN, State.HALF_OPEN),
    ],
)
def test_moves_outside_the_table_raise(a: State, b: State) -> None:
    """Anything not in TRANSITIONS raises IllegalTransition."""
    with pytest.raises(IllegalTransition):
        check_transition(a, b)


# -- configuration -----------------------------------------------------------------------------


def test_config_rejects_minimum_calls_above_window() -> None:
    """A rate rule that could never fire is a configuration error, also when decoded."""
    with pytest.raises(ValueError, match="minimum_calls"):
        BreakerConfig(window_size=5, minimum_calls=6)
    with pytest.raises(msgspec.ValidationError, match="minimum_calls"):
        msgspec.convert({"window_size": 5, "minimum_calls": 6}, BreakerConfig)


def test_config_from_settings_uses_the_cb_variables() -> None:
    """CB_FAIL_THRESHOLD and CB_RESET_SEC set the consecutive rule and the first period."""
    cfg = BreakerConfig.from_settings(
        Settings(cb_fail_threshold=3, cb_reset_sec=600.0), auto_half_open=False
    )
    assert cfg.consecutive_failures == 3
    assert cfg.reset_sec == 600.0
    assert cfg.max_reset_sec == 600.0  # a reset above the default cap raises the cap
    assert cfg.auto_half_open is False


# -- trip rules --------------------------------------------------------------------------------


def test_consecutive_failures_open_it() -> None:
    """consecutive_failures failures in a row open it; a success in between resets the count."""
    h = Harness(BreakerConfig(consecutive_failures=3))
    b = h.breaker
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert state_of(b) is State.CLOSED
    b.record_failure(reason="http_503")
    assert state_of(b) is State.OPEN
    assert b.trips == 1
    assert h.moves() == [(State.CLOSED, State.OPEN, "local")]
    assert "3 consecutive failures" in h.events[0].reason
    assert "http_503" in h.events[0].reason


def test_failure_rate_needs_minimum_calls() -> None:
    """The failure-rate rule waits for minimum_calls, then opens at failure_rate."""
    h = Harness(BreakerConfig(window_size=10, minimum_calls=6, consecutive_failures=100))
    b = h.breaker
    for _ in range(5):
        b.record_failure()
    assert state_of(b) is State.CLOSED  # 100% failures, but only 5 calls
    b.record_failure()
    assert state_of(b) is State.OPEN
    assert "failure rate 6/6" in h.events[0].reason


def test_failure_rate_can_be_reached_by_a_success() -> None:
    """The call that brings the window to minimum_calls is judged even if it succeeded."""
    h = Harness(BreakerConfig(window_size=10, minimum_calls=4, consecutive_failures=100))
    b = h.breaker
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert state_of(b) is State.CLOSED
    b.record_success()  # 2/4 failures = failure_rate 0.5
    assert state_of(b) is State.OPEN


def test_failure_rate_below_threshold_stays_closed() -> None:
    """Failures under failure_rate keep it closed however many calls there are."""
    h = Harness(BreakerConfig(window_size=10, minimum_calls=4, consecutive_failures=100))
    b = h.breaker
    for _ in range(30):
        b.record_success()
        b.record_success()
        b.record_failure()
    assert state_of(b) is State.CLOSED
    assert b.snapshot()["calls_in_window"] == 10


def test_window_forgets_old_calls() -> None:
    """The window holds only the last window_size calls."""
    h = Harness(BreakerConfig(window_size=4, minimum_calls=4, consecutive_failures=100))
    b = h.breaker
    b.record_failure()
    for _ in range(4):
        b.record_success()
    snap = b.snapshot()
    assert snap["calls_in_window"] == 4
    assert snap["failure_rate"] == 0.0


def test_slow_call_rate_opens_it() -> None:
    """Successful calls at least slow_call_sec long open it at slow_call_rate."""
    h = Harness(BreakerConfig(window_size=10, minimum_calls=5, slow_call_sec=2.0))
    b = h.breaker
    for _ in range(3):
        b.record_success(duration_sec=2.0)
    b.record_success(duration_sec=0.1)
    assert state_of(b) is State.CLOSED  # 4 calls: under minimum_calls
    b.record_success(duration_sec=5.0)  # 4/5 slow = slow_call_rate 0.8
    assert state_of(b) is State.OPEN
    assert "slow call rate 4/5" in h.events[0].reason


def test_slow_calls_need_minimum_calls() -> None:
    """All-slow traffic does not open it before minimum_calls."""
    h = Harness(BreakerConfig(window_size=10, minimum_calls=5, slow_call_sec=2.0))
    b = h.breaker
    for _ in range(4):
        b.record_success(duration_sec=60.0)
    assert state_of(b) is State.CLOSED
    assert b.snapshot()["slow_call_rate"] == 1.0


def test_slow_failure_counts_as_failure_not_slow() -> None:
    """Only successes are slow calls; a long failure is just a failure."""
    h = Harness(BreakerConfig(consecutive_failures=100, slow_call_sec=1.0))
    b = h.breaker
    b.record_failure(duration_sec=30.0)
    snap = b.snapshot()
    assert snap["slow_call_rate"] == 0.0
    assert snap["failure_rate"] == 1.0


def test_config_swap_flips_passive_mode_and_keeps_state() -> None:
    """Assigning a new config switches auto_half_open without losing the state or period."""
    h = Harness(BreakerConfig(auto_half_open=False, reset_sec=10.0))
    b = h.breaker
    trip(h)
    h.clock.advance(10.0)
    assert b.allow() is False
    b.config = msgspec.structs.replace(b.config, auto_half_open=True)
    assert b.allow() is True
    assert state_of(b) is State.HALF_OPEN


def test_config_swap_with_new_window_size_empties_the_window() -> None:
    """A different window_size starts a fresh window of that size."""
    h = Harness(BreakerConfig(window_size=4, minimum_calls=4, consecutive_failures=100))
    b = h.breaker
    for _ in range(3):
        b.record_failure()
    b.config = BreakerConfig(window_size=2, minimum_calls=2, consecutive_failures=100)
    assert b.snapshot()["calls_in_window"] == 0
    b.record_success()
    b.record_success()
    b.record_success()
    assert b.snapshot()["calls_in_window"] == 2
    assert state_of(b) is State.CLOSED


# -- the open period ---------------------------------------------------------------------------


def test_open_rejects_until_period_over_then_half_opens() -> None:
    """OPEN refuses calls for reset_sec, then (auto mode) hands out one trial permit."""
    h = Harness(BreakerConfig(reset_sec=30.0))
    b = h.breaker
    trip(h)
    assert h.events[-1].open_for == 30.0
    assert b.retry_in() == 30.0
    h.clock.advance(29.5)
    assert b.allow() is False
    assert b.retry_in() == 0.5
    assert state_of(b) is State.OPEN
    h.clock.advance(0.5)
    assert state_of(b) is State.OPEN  # reading the state never transitions
    assert b.allow() is True
    assert state_of(b) is State.HALF_OPEN
    assert b.retry_in() == 0.0
    assert h.moves()[-1] == (State.OPEN, State.HALF_OPEN, "local")


def test_open_period_grows_and_is_capped() -> None:
    """Each half-open failure multiplies the open period, up to max_reset_sec."""
    h = Harness(BreakerConfig(reset_sec=10.0, backoff_multiplier=3.0, max_reset_sec=100.0))
    b = h.breaker
    trip(h)
    periods = [h.events[-1].open_for]
    for _ in range(4):
        h.clock.advance(b.retry_in())
        assert b.allow() is True
        b.record_failure()
        periods.append(h.events[-1].open_for)
    assert periods == [10.0, 30.0, 90.0, 100.0, 100.0]
    assert b.trips == 5


def test_huge_trip_count_does_not_overflow() -> None:
    """The period formula stays at the cap however many trips there were."""
    cfg = BreakerConfig(backoff_multiplier=10.0)
    assert cfg.open_period(10_000) == cfg.max_reset_sec


def test_no_half_open_without_auto_mode_until_remote() -> None:
    """With auto_half_open off it stays OPEN until the shared state says HALF_OPEN."""
    h = Harness(BreakerConfig(auto_half_open=False, reset_sec=5.0))
    b = h.breaker
    trip(h)
    h.clock.advance(3600.0)
    assert b.allow() is False
    assert state_of(b) is State.OPEN
    b.apply_remote(State.HALF_OPEN, "healthd probe window")
    assert state_of(b) is State.HALF_OPEN
    assert b.allow() is True
    assert h.moves()[-1] == (State.OPEN, State.HALF_OPEN, "remote")


# -- half-open ---------------------------------------------------------------------------------


def half_open(h: Harness) -> None:
    """Trip the breaker and wait out its period (without taking a permit)."""
    trip(h)
    h.breaker.apply_remote(State.HALF_OPEN, "test")


def test_half_open_permits_are_limited() -> None:
    """HALF_OPEN lets at most half_open_max_calls trials be in flight."""
    h = Harness(BreakerConfig(half_open_max_calls=2, half_open_successes=5))
    b = h.breaker
    half_open(h)
    assert [b.allow(), b.allow(), b.allow()] == [True, True, False]
    b.record_success()
    assert b.allow() is True
    assert b.allow() is False


def test_half_open_closes_after_successes() -> None:
    """half_open_successes trial successes close it, resetting trips and the window."""
    h = Harness(BreakerConfig(half_open_successes=2))
    b = h.breaker
    trip(h)
    h.clock.advance(b.retry_in())
    assert b.allow() is True
    b.record_success()
    assert state_of(b) is State.HALF_OPEN
    assert b.allow() is True
    b.record_success()
    assert state_of(b) is State.CLOSED
    assert b.trips == 0
    snap = b.snapshot()
    assert snap["calls_in_window"] == 0
    assert snap["consecutive_failures"] == 0
    assert h.moves()[-1] == (State.HALF_OPEN, State.CLOSED, "local")


def test_half_open_failure_reopens_for_longer() -> None:
    """A failed trial re-opens it with the next, longer open period."""
    h = Harness(BreakerConfig(reset_sec=30.0))
    b = h.breaker
    trip(h)
    h.clock.advance(30.0)
    assert b.allow() is True
    b.record_failure(reason="timeout")
    assert state_of(b) is State.OPEN
    assert b.trips == 2
    assert h.events[-1].open_for == 60.0
    assert "timeout" in h.events[-1].reason
    assert b.retry_in() == 60.0


def test_slow_trial_reopens() -> None:
    """A trial that succeeds but slowly does not count as a recovery."""
    h = Harness(BreakerConfig(slow_call_sec=5.0))
    b = h.breaker
    half_open(h)
    assert b.allow() is True
    b.record_success(duration_sec=9.0)
    assert state_of(b) is State.OPEN


def test_record_ignored_releases_a_permit_and_counts_nothing() -> None:
    """record_ignored frees the half-open permit without moving towards closing or opening."""
    h = Harness(BreakerConfig(half_open_max_calls=1, half_open_successes=1))
    b = h.breaker
    half_open(h)
    assert b.allow() is True
    assert b.allow() is False
    b.record_ignored()
    assert state_of(b) is State.HALF_OPEN
    assert b.allow() is True


def test_record_ignored_in_closed_counts_nothing() -> None:
    """An ignored outcome is not a call of the window and does not break a failure run."""
    h = Harness(BreakerConfig(consecutive_failures=2))
    b = h.breaker
    b.record_failure()
    b.record_ignored()
    assert b.snapshot()["calls_in_window"] == 1
    b.record_failure()
    assert state_of(b) is State.OPEN


def test_records_while_open_are_ignored() -> None:
    """Outcomes landing after the breaker opened (calls started before) change nothing."""
    h = Harness(BreakerConfig(reset_sec=30.0))
    b = h.breaker
    trip(h)
    before = b.snapshot()
    h.clock.advance(10.0)
    b.record_success(duration_sec=60.0)
    b.record_failure()
    b.record_ignored()
    after = b.snapshot()
    assert state_of(b) is State.OPEN
    assert after == {**before, "retry_in": 20.0}
    assert len(h.events) == 1


def test_records_without_a_permit_are_not_trials() -> None:
    """In HALF_OPEN, outcomes of calls that hold no trial permit are not trial results."""
    h = Harness(BreakerConfig(half_open_successes=1))
    b = h.breaker
    half_open(h)
    b.record_failure()  # a call from before the trip, finishing late
    b.record_success()
    assert state_of(b) is State.HALF_OPEN
    assert b.allow() is True
    b.record_success()
    assert state_of(b) is State.CLOSED


# -- administration and the shared state -------------------------------------------------------


def test_force_open_and_reset() -> None:
    """force_open opens for the given period; reset closes and forgets everything."""
    h = Harness()
    b = h.breaker
    b.record_failure()
    b.force_open("maintenance", open_for=600.0)
    assert state_of(b) is State.OPEN
    assert b.retry_in() == 600.0
    assert h.events[-1].open_for == 600.0
    assert h.events[-1].reason == "maintenance"
    b.force_open("longer", open_for=900.0)  # already open: re-armed, no transition
    assert b.retry_in() == 900.0
    assert len(h.events) == 1
    b.reset("fixed", source="admin")
    assert state_of(b) is State.CLOSED
    assert b.trips == 0
    assert b.snapshot()["calls_in_window"] == 0
    assert h.moves() == [
        (State.CLOSED, State.OPEN, "admin"),
        (State.OPEN, State.CLOSED, "admin"),
    ]


def test_reset_when_closed_clears_without_transition() -> None:
    """reset on a closed breaker empties the window but reports nothing."""
    h = Harness(BreakerConfig(consecutive_failures=3))
    b = h.breaker
    b.record_failure()
    b.record_failure()
    b.reset("clear")
    b.record_failure()
    b.record_failure()
    assert state_of(b) is State.CLOSED
    assert h.events == []


def test_force_open_from_half_open_uses_the_next_period() -> None:
    """force_open without open_for uses the growing period like any other trip."""
    h = Harness(BreakerConfig(reset_sec=10.0))
    b = h.breaker
    half_open(h)
    b.force_open("probe says no", source="probe")
    assert h.moves()[-1] == (State.HALF_OPEN, State.OPEN, "probe")
    assert h.events[-1].open_for == 20.0


def test_apply_remote_walks_intermediate_states() -> None:
    """CLOSED -> HALF_OPEN from the shared state is reported as CLOSED -> OPEN -> HALF_OPEN."""
    h = Harness()
    b = h.breaker
    b.apply_remote(State.HALF_OPEN, "healthd: probing")
    assert state_of(b) is State.HALF_OPEN
    assert h.moves() == [
        (State.CLOSED, State.OPEN, "remote"),
        (State.OPEN, State.HALF_OPEN, "remote"),
    ]
    assert h.events[0].open_for == 0.0
    assert h.events[1].open_for is None
    assert all(e.reason == "healthd: probing" for e in h.events)


def test_apply_remote_direct_and_noop() -> None:
    """A remote state is adopted directly when legal, and is a no-op when already held."""
    h = Harness()
    b = h.breaker
    b.apply_remote(State.OPEN, "web-2 tripped", open_for=45.0)
    assert b.retry_in() == 45.0
    b.apply_remote(State.OPEN, "again")
    assert len(h.events) == 1
    b.apply_remote(State.CLOSED, "healthd: recovered")
    assert state_of(b) is State.CLOSED
    assert b.trips == 0
    assert h.moves() == [
        (State.CLOSED, State.OPEN, "remote"),
        (State.OPEN, State.CLOSED, "remote"),
    ]


def test_callback_gets_every_transition_with_its_source() -> None:
    """Every transition reaches the callback, labelled local, remote, admin or probe."""
    h = Harness(BreakerConfig(half_open_successes=1, reset_sec=1.0))
    b = h.breaker
    t0 = h.clock.now
    trip(h)  # local
    h.clock.advance(1.0)
    assert b.allow() is True  # local
    b.record_success()  # local
    b.apply_remote(State.OPEN, "peer")  # remote
    b.reset("operator")  # admin
    b.force_open("probe failed", source="probe")  # probe
    assert h.moves() == [
        (State.CLOSED, State.OPEN, "local"),
        (State.OPEN, State.HALF_OPEN, "local"),
        (State.HALF_OPEN, State.CLOSED, "local"),
        (State.CLOSED, State.OPEN, "remote"),
        (State.OPEN, State.CLOSED, "admin"),
        (State.CLOSED, State.OPEN, "probe"),
    ]
    assert all(e.name == "alpha" for e in h.events)
    assert [e.at for e in h.events] == [t0] + [t0 + 1.0] * 5


def test_probe_breaker_labels_its_own_transitions() -> None:
    """A breaker built with source="probe" (healthd's) reports its own moves as probe."""
    clock = FakeClock()
    events: list[Transition] = []
    b = Breaker(
        "alpha",
        BreakerConfig(consecutive_failures=1),
        clock=clock,
        on_transition=events.append,
        source="probe",
    )
    b.record_failure()
    assert [e.source for e in events] == ["probe"]


def test_raising_callback_does_not_break_it(caplog: pytest.LogCaptureFixture) -> None:
    """A callback that raises is logged; the breaker still moves and keeps working."""

    def boom(_: Transition) -> None:
        raise RuntimeError("subscriber down")

    clock = FakeClock()
    b = Breaker("alpha", BreakerConfig(consecutive_failures=1), clock=clock, on_transition=boom)
    with caplog.at_level(logging.ERROR, logger="bulwark.breaker"):
        b.record_failure()
    assert state_of(b) is State.OPEN
    assert any("callback failed" in r.getMessage() for r in caplog.records)
    clock.advance(b.retry_in())
    assert b.allow() is True
    assert state_of(b) is State.HALF_OPEN


def test_snapshot_shape() -> None:
    """snapshot() carries what /health/circuit-breakers shows."""
    h = Harness(BreakerConfig(consecutive_failures=100, slow_call_sec=1.0))
    b = h.breaker
    b.record_success(duration_sec=2.0)
    b.record_failure()
    b.record_failure()
    b.record_success()
    assert b.snapshot() == {
        "name": "alpha",
        "state": "closed",
        "failure_rate": 0.5,
        "slow_call_rate": 0.25,
        "calls_in_window": 4,
        "failures_in_window": 2,
        "slow_calls_in_window": 1,
        "consecutive_failures": 0,
        "trips": 0,
        "retry_in": 0.0,
        "half_open_in_flight": 0,
    }


# -- random sequences --------------------------------------------------------------------------

SOURCES = {"local", "remote", "admin", "probe"}


@settings(max_examples=200, deadline=None)
class BreakerMachine(RuleBasedStateMachine):
    """Random operations never produce an illegal, unchained or unreported transition."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.events: list[Transition] = []
        self.breaker = Breaker("alpha", BreakerConfig(), clock=self.clock)

    @initialize(
        window=st.integers(1, 6),
        data=st.data(),
        consecutive=st.integers(1, 4),
        max_calls=st.integers(1, 3),
        successes=st.integers(1, 3),
        reset_sec=st.floats(0.0, 10.0),
        auto=st.booleans(),
    )
    def build(
        self,
        window: int,
        data: st.DataObject,
        consecutive: int,
        max_calls: int,
        successes: int,
        reset_sec: float,
        auto: bool,
    ) -> None:
        config = BreakerConfig(
            window_size=window,
            minimum_calls=data.draw(st.integers(1, window)),
            consecutive_failures=consecutive,
            slow_call_sec=1.0,
            half_open_max_calls=max_calls,
            half_open_successes=successes,
            reset_sec=reset_sec,
            max_reset_sec=reset_sec * 4,
            auto_half_open=auto,
        )
        self.breaker = Breaker("alpha", config, clock=self.clock, on_transition=self.events.append)

    @rule()
    def allow(self) -> None:
        self.breaker.allow()

    @rule(duration=st.sampled_from([0.0, 0.5, 1.0, 30.0]))
    def success(self, duration: float) -> None:
        self.breaker.record_success(duration_sec=duration)

    @rule(duration=st.sampled_from([0.0, 30.0]))
    def failure(self, duration: float) -> None:
        self.breaker.record_failure(duration_sec=duration)

    @rule()
    def ignored(self) -> None:
        self.breaker.record_ignored()

    @rule(seconds=st.floats(0.0, 60.0))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(state=st.sampled_from(State), open_for=st.none() | st.floats(0.0, 60.0))
    def remote(self, state: State, open_for: float | None) -> None:
        self.breaker.apply_remote(state, "remote", open_for=open_for)

    @rule(open_for=st.none() | st.floats(0.0, 60.0))
    def force_open(self, open_for: float | None) -> None:
        self.breaker.force_open("admin", open_for=open_for)

    @rule()
    def reset(self) -> None:
        self.breaker.reset("admin")

    @invariant()
    def transitions_are_legal_and_chained(self) -> None:
        previous = State.CLOSED
        for event in self.events:
            assert (event.from_state, event.to_state) in TRANSITIONS
            assert event.from_state is previous
            assert event.source in SOURCES
            if event.to_state is State.OPEN:
                assert event.open_for is not None
                assert event.open_for >= 0.0
            else:
                assert event.open_for is None
            previous = event.to_state

    @invariant()
    def state_is_the_last_reported(self) -> None:
        expected = self.events[-1].to_state if self.events else State.CLOSED
        assert state_of(self.breaker) is expected

    @invariant()
    def trials_within_limit(self) -> None:
        in_flight = self.breaker.snapshot()["half_open_in_flight"]
        assert isinstance(in_flight, int)
        assert 0 <= in_flight <= self.breaker.config.half_open_max_calls
        if self.breaker.state is not State.HALF_OPEN:
            assert in_flight == 0

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        b = self.breaker
        snap = b.snapshot()
        calls = snap["calls_in_window"]
        assert isinstance(calls, int)
        assert 0 <= calls <= b.config.window_size
        assert b.retry_in() >= 0.0
        if b.state is State.CLOSED:
            assert b.trips == 0
        else:
            assert b.trips >= 1
        if b.state is not State.OPEN:
            assert b.retry_in() == 0.0


TestBreakerMachine = BreakerMachine.TestCase
