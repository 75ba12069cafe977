"""Breaker recovery driven by healthd's probes, on a fake clock."""

from __future__ import annotations

from bulwark.breaker import BreakerConfig, State
from bulwark.state import StateRow
from healthd.recovery import Recovery

RESET = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: Clock) -> Recovery:
    config = BreakerConfig(reset_sec=RESET, half_open_successes=2, auto_half_open=True)
    return Recovery(["alpha", "beta"], config, clock=clock)


def opened_by_web(recovery: Recovery, open_for: float | None = RESET) -> None:
    recovery.adopt(StateRow(provider="alpha", breaker="open", reason="5 consecutive failures",
                            seq=1, open_for=open_for, updated_by="web:h:1"))


def state(recovery: Recovery, name: str) -> State:
    return recovery.breakers[name].state


def probe(recovery: Recovery, name: str, ok: bool) -> None:
    token = recovery.before_probe(name)
    recovery.after_probe(name, token, ok=ok, duration_sec=0.01, reason="" if ok else "server_error")


def test_remote_open_is_mirrored_but_not_republished() -> None:
    """An "open" published by a web process is adopted without healthd echoing it back."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    assert state(recovery, "alpha") is State.OPEN
    assert recovery.take_outbox() == []
    assert recovery.next_due_in() == RESET


def test_open_period_over_moves_to_half_open_and_publishes() -> None:
    """Once the open period is over, healthd moves the breaker to half-open and says so."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET - 1)
    assert recovery.due() == []
    clock.advance(1)
    assert recovery.due() == ["alpha"]
    [t] = recovery.take_outbox()
    assert (t.name, t.from_state, t.to_state) == ("alpha", State.OPEN, State.HALF_OPEN)


def test_probe_successes_close_the_breaker() -> None:
    """Two successful trial probes close it, and the close is published."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET)
    recovery.due()
    recovery.take_outbox()
    probe(recovery, "alpha", True)
    assert state(recovery, "alpha") is State.HALF_OPEN
    probe(recovery, "alpha", True)
    assert state(recovery, "alpha") is State.CLOSED
    [t] = recovery.take_outbox()
    assert (t.from_state, t.to_state) == (State.HALF_OPEN, State.CLOSED)


def test_failed_trial_reopens_for_longer() -> None:
    """A failed trial probe opens the breaker again, for a longer period than before."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET)
    recovery.due()
    probe(recovery, "alpha", False)
    outbox = recovery.take_outbox()
    assert [t.to_state for t in outbox] == [State.HALF_OPEN, State.OPEN]
    assert outbox[-1].open_for == 2 * RESET
    assert "server_error" in outbox[-1].reason
    clock.advance(RESET)
    assert recovery.due() == []
    clock.advance(RESET)
    assert recovery.due() == ["alpha"]


def test_probe_of_a_due_breaker_is_a_trial_without_a_tick() -> None:
    """A probe that starts after the open period ended is itself the first trial."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET)
    probe(recovery, "alpha", True)
    probe(recovery, "alpha", True)
    assert state(recovery, "alpha") is State.CLOSED


def test_probes_while_closed_or_open_leave_the_breaker_alone() -> None:
    """Failures of a closed provider are health's business, not the breaker's; an open
    breaker is not tested before its period is over."""
    clock = Clock()
    recovery = make(clock)
    for _ in range(20):
        probe(recovery, "beta", False)
    assert state(recovery, "beta") is State.CLOSED
    opened_by_web(recovery)
    probe(recovery, "alpha", True)
    assert state(recovery, "alpha") is State.OPEN
    assert recovery.take_outbox() == []


def test_own_echoes_are_ignored_but_a_snapshot_is_adopted() -> None:
    """A late echo of healthd's own "half_open" must not reopen a breaker it has closed;
    a snapshot read on taking over adopts healthd rows all the same."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET)
    recovery.due()
    probe(recovery, "alpha", True)
    probe(recovery, "alpha", True)
    echo = StateRow(provider="alpha", breaker="half_open", reason="open period over", seq=2,
                    updated_by="healthd")
    recovery.adopt(echo)
    assert state(recovery, "alpha") is State.CLOSED
    fresh = make(clock)
    fresh.adopt(echo, snapshot=True)
    assert state(fresh, "alpha") is State.HALF_OPEN
    assert fresh.take_outbox() == []
    probe(fresh, "alpha", True)
    probe(fresh, "alpha", True)
    assert state(fresh, "alpha") is State.CLOSED


def test_trial_permit_is_void_after_a_remote_change() -> None:
    """A probe that was running when an admin reset the breaker does not count as a trial."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET)
    recovery.due()
    token = recovery.before_probe("alpha")
    assert token is not None
    recovery.adopt(StateRow(provider="alpha", breaker="closed", reason="admin reset", seq=3,
                            updated_by="admin"))
    recovery.adopt(StateRow(provider="alpha", breaker="open", reason="tripped", seq=4,
                            open_for=0.0, updated_by="web:h:2"))
    recovery.adopt(StateRow(provider="alpha", breaker="half_open", reason="x", seq=5,
                            updated_by="web:h:2"))
    recovery.after_probe("alpha", token, ok=False, duration_sec=0.1, reason="server_error")
    assert state(recovery, "alpha") is State.HALF_OPEN


def test_probe_already_running_at_half_open_is_not_a_trial() -> None:
    """A probe sent while the breaker was still open does not count as a trial; the permit
    waits for the next probe."""
    clock = Clock()
    recovery = make(clock)
    opened_by_web(recovery)
    clock.advance(RESET - 0.1)
    early = recovery.before_probe("alpha")
    assert early is None
    clock.advance(0.1)
    assert recovery.due() == ["alpha"]
    recovery.after_probe("alpha", early, ok=False, duration_sec=0.1, reason="server_error")
    assert state(recovery, "alpha") is State.HALF_OPEN
    probe(recovery, "alpha", True)
    probe(recovery, "alpha", True)
    assert state(recovery, "alpha") is State.CLOSED


def test_rows_of_unknown_providers_and_states_are_ignored() -> None:
    """A row for a provider healthd does not probe, or with a state it does not know,
    changes nothing."""
    recovery = make(Clock())
    recovery.adopt(StateRow(provider="gamma", breaker="open", seq=1))
    recovery.adopt(StateRow(provider="alpha", breaker="sideways", seq=1))
    assert all(b.state is State.CLOSED for b in recovery.breakers.values())
