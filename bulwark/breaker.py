"""A per-provider circuit breaker: a pure state machine, no I/O, no asyncio.

Modelled on resilience4j's ``CircuitBreakerStateMachine``: the states are an enum, the legal
moves a table (anything else raises `IllegalTransition`), time comes from an injected clock
and every transition is handed to one callback, which is where telemetry and the state bus
subscribe. Both the web process (its own calls, plus states applied from Postgres) and
healthd (its probes) run these.

::

               trip rule / force_open / remote
      CLOSED ─────────────────────────────────▶ OPEN ◀──────────┐
         ▲  ▲                                   │               │ a trial fails
         │  │ reset / remote                    │ open period   │ (or is slow)
         │  └───────────────────────────────────┤ over (auto)   │
         │                                      ▼ or remote     │
         └──────────── N trial successes ──── HALF_OPEN ────────┘

Usage contract: every ``allow()`` that returned True is followed by exactly one
``record_success``/``record_failure``/``record_ignored`` for that call (a ``finally`` is the
place for ``record_ignored`` when the call was cancelled), otherwise a half-open trial
permit is never given back.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING, Final

import msgspec

if TYPE_CHECKING:
    from collections.abc import Callable

    from bulwark.config import Settings

logger = logging.getLogger("bulwark.breaker")


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: The legal moves. There is no CLOSED -> HALF_OPEN: a trial only makes sense after an
#: open period, so a remote HALF_OPEN seen while CLOSED is walked through OPEN.
TRANSITIONS: Final[frozenset[tuple[State, State]]] = frozenset(
    {
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.OPEN, State.CLOSED),
        (State.HALF_OPEN, State.OPEN),
        (State.HALF_OPEN, State.CLOSED),
    }
)


class IllegalTransition(Exception):
    """A move that is not in `TRANSITIONS` was attempted."""


def check_transition(from_state: State, to_state: State) -> None:
    """Raise `IllegalTransition` unless ``from_state -> to_state`` is in the table."""
    if (from_state, to_state) not in TRANSITIONS:
        raise IllegalTransition(f"{from_state} -> {to_state} is not a legal transition")


def _shortest_paths() -> dict[tuple[State, State], tuple[State, ...]]:
    """For every pair of distinct states, the states visited after the first (BFS)."""
    paths: dict[tuple[State, State], tuple[State, ...]] = {}
    for start in State:
        seen: dict[State, tuple[State, ...]] = {start: ()}
        frontier = [start]
        while frontier:
            nxt: list[State] = []
            for here in frontier:
                for a, b in sorted(TRANSITIONS):
                    if a is here and b not in seen:
                        seen[b] = (*seen[here], b)
                        nxt.append(b)
            frontier = nxt
        for end, path in seen.items():
            if end is not start:
                paths[(start, end)] = path
    return paths


#: Computed from the table once, so apply_remote can never take an illegal step.
_PATHS: Final = _shortest_paths()

# Bits of one window slot: a byte per call keeps the ring a flat bytearray (no per-call
# allocation on the request path).
_FAILED: Final = 1
_SLOW: Final = 2

#: Default ceiling of the growing open period: five minutes is long enough that a dead
#: provider costs one trial per five minutes, short enough that recovery is noticed soon.
DEFAULT_MAX_RESET_SEC: Final = 300.0


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    window_size: int = 20
    minimum_calls: int = 10
    failure_rate: float = 0.5
    consecutive_failures: int = 5
    slow_call_sec: float = 10.0
    slow_call_rate: float = 0.8
    half_open_max_calls: int = 1
    half_open_successes: int = 2
    reset_sec: float = 30.0
    max_reset_sec: float = DEFAULT_MAX_RESET_SEC
    backoff_multiplier: float = 2.0
    #: Passive mode: OPEN -> HALF_OPEN by itself once the open period is over. False when
    #: healthd drives recovery and this process only follows the shared state.
    auto_half_open: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.window_size >= 1, "window_size must be >= 1"),
            (
                1 <= self.minimum_calls <= self.window_size,
                "minimum_calls must be in 1..window_size",
            ),
            (0.0 < self.failure_rate <= 1.0, "failure_rate must be in (0, 1]"),
            (0.0 < self.slow_call_rate <= 1.0, "slow_call_rate must be in (0, 1]"),
            (self.consecutive_failures >= 1, "consecutive_failures must be >= 1"),
            (self.slow_call_sec > 0, "slow_call_sec must be > 0"),
            (self.half_open_max_calls >= 1, "half_open_max_calls must be >= 1"),
            (self.half_open_successes >= 1, "half_open_successes must be >= 1"),
            (self.reset_sec >= 0, "reset_sec must be >= 0"),
            (self.max_reset_sec >= self.reset_sec, "max_reset_sec must be >= reset_sec"),
            (self.backoff_multiplier >= 1.0, "backoff_multiplier must be >= 1"),
        )
        problems = [message for ok, message in checks if not ok]
        if problems:
            # ValueError is what msgspec turns into a ValidationError when decoding.
            raise ValueError("invalid BreakerConfig: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings: Settings, *, auto_half_open: bool = True) -> BreakerConfig:
        """The config that CB_FAIL_THRESHOLD and CB_RESET_SEC describe."""
        return cls(
            consecutive_failures=settings.cb_fail_threshold,
            reset_sec=settings.cb_reset_sec,
            # An operator who sets CB_RESET_SEC above the default cap means it as a floor.
            max_reset_sec=max(DEFAULT_MAX_RESET_SEC, settings.cb_reset_sec),
            auto_half_open=auto_half_open,
        )

    def open_period(self, trips: int) -> float:
        """Seconds the breaker stays open on its ``trips``-th consecutive trip."""
        if trips <= 1:
            return self.reset_sec
        try:
            period = self.reset_sec * self.backoff_multiplier ** (trips - 1)
        except OverflowError:
            return self.max_reset_sec
        return min(period, self.max_reset_sec)


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    from_state: State
    to_state: State
    reason: str
    #: "local" (own calls), "remote" (applied from the shared state), "admin", "probe".
    source: str
    at: float
    #: Seconds it stays open, for transitions into OPEN; None otherwise.
    open_for: float | None = None


class Breaker:
    """One provider's breaker. Single-threaded: call it from one event loop only."""

    __slots__ = (
        "_calls",
        "_clock",
        "_config",
        "_consecutive",
        "_failures",
        "_in_flight",
        "_on_transition",
        "_open_until",
        "_pos",
        "_ring",
        "_slow",
        "_source",
        "_state",
        "_trial_successes",
        "_trips",
        "name",
    )

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[Transition], None] | None = None,
        source: str = "local",
    ) -> None:
        """``source`` labels transitions caused by this breaker's own recorded outcomes and
        its own open-period expiry: "local" in web, "probe" for healthd's probe breakers."""
        self.name = name
        self._config = config
        self._clock = clock
        self._on_transition = on_transition
        self._source = source
        self._state = State.CLOSED
        self._ring = bytearray(config.window_size)
        self._pos = 0
        self._calls = 0
        self._failures = 0
        self._slow = 0
        self._consecutive = 0
        self._trips = 0
        self._open_until = 0.0
        self._in_flight = 0
        self._trial_successes = 0

    # -- reads -------------------------------------------------------------------------------

    @property
    def config(self) -> BreakerConfig:
        return self._config

    @config.setter
    def config(self, config: BreakerConfig) -> None:
        """Swap the config at run time (web flips auto_half_open as healthd comes and goes).
        The state and the open period are kept; a new window size starts an empty window."""
        if config.window_size != len(self._ring):
            self._ring = bytearray(config.window_size)
            self._pos = self._calls = self._failures = self._slow = 0
        self._config = config

    @property
    def state(self) -> State:
        return self._state

    @property
    def trips(self) -> int:
        return self._trips

    def retry_in(self) -> float:
        if self._state is not State.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def snapshot(self) -> dict[str, object]:
        calls = self._calls
        return {
            "name": self.name,
            "state": str(self._state),
            "failure_rate": self._failures / calls if calls else 0.0,
            "slow_call_rate": self._slow / calls if calls else 0.0,
            "calls_in_window": calls,
            "failures_in_window": self._failures,
            "slow_calls_in_window": self._slow,
            "consecutive_failures": self._consecutive,
            "trips": self._trips,
            "retry_in": self.retry_in(),
            "half_open_in_flight": self._in_flight,
        }

    # -- the request path --------------------------------------------------------------------

    def allow(self) -> bool:
        state = self._state
        if state is State.CLOSED:
            return True
        if state is State.OPEN:
            if not self._config.auto_half_open or self._clock() < self._open_until:
                return False
            self._transition(State.HALF_OPEN, "open period over", self._source)
            self._in_flight = 1
            return True
        if self._in_flight < self._config.half_open_max_calls:
            self._in_flight += 1
            return True
        return False

    def record_success(self, duration_sec: float = 0.0) -> None:
        state = self._state
        slow = duration_sec >= self._config.slow_call_sec
        if state is State.CLOSED:
            self._consecutive = 0
            judged = self._calls >= self._config.minimum_calls
            self._push(_SLOW if slow else 0)
            # Even a success can trip: the one that brings the window up to minimum_calls.
            # Past that, a quick success only lowers both rates: nothing to check.
            if slow or not judged:
                self._check_rates("success")
        elif state is State.HALF_OPEN:
            if not self._take_permit():
                return
            if slow:
                # A trial that answers but too slowly is not a recovery (slow is broken
                # for a chat user); closing on it would only flap back on the slow rule.
                self._open(f"slow trial ({duration_sec:.1f}s)", self._source, None)
                return
            self._trial_successes += 1
            if self._trial_successes >= self._config.half_open_successes:
                self._close(f"{self._trial_successes} trial successes", self._source)
        # OPEN: the call started before the breaker opened; its outcome is old news.

    def record_failure(self, duration_sec: float = 0.0, reason: str = "failure") -> None:
        del duration_sec  # a failure is a failure however long it took
        state = self._state
        if state is State.CLOSED:
            self._consecutive += 1
            self._push(_FAILED)
            if self._consecutive >= self._config.consecutive_failures:
                self._open(f"{self._consecutive} consecutive failures: {reason}", self._source)
            else:
                self._check_rates(reason)
        elif state is State.HALF_OPEN and self._take_permit():
            self._open(f"trial failed: {reason}", self._source)

    def record_ignored(self) -> None:
        if self._state is State.HALF_OPEN:
            self._take_permit()

    # -- administration and the shared state -------------------------------------------------

    def force_open(
        self, reason: str, *, source: str = "admin", open_for: float | None = None
    ) -> None:
        """Open now. Already open: only the open period is re-armed (no transition)."""
        if self._state is State.OPEN:
            period = self._config.open_period(self._trips) if open_for is None else open_for
            self._open_until = self._clock() + max(0.0, period)
            return
        self._open(reason, source, open_for)

    def reset(self, reason: str, *, source: str = "admin") -> None:
        """Close now, forgetting the window and the trip count."""
        if self._state is State.CLOSED:
            self._clear()
            return
        self._close(reason, source)

    def apply_remote(self, state: State, reason: str, *, open_for: float | None = None) -> None:
        """Adopt a state decided elsewhere, walking legal intermediate states if needed."""
        if state is self._state:
            return
        path = _PATHS[(self._state, state)]
        for step in path:
            if step is State.OPEN:
                # OPEN on the way to HALF_OPEN lasts no time: the target says the open
                # period is already over.
                self._open(reason, "remote", open_for if step is state else 0.0)
            elif step is State.HALF_OPEN:
                self._transition(State.HALF_OPEN, reason, "remote")
            else:
                self._close(reason, "remote")

    # -- internals ---------------------------------------------------------------------------

    def _push(self, outcome: int) -> None:
        ring = self._ring
        pos = self._pos
        if self._calls == len(ring):
            old = ring[pos]
            self._failures -= old & _FAILED
            self._slow -= (old & _SLOW) >> 1
        else:
            self._calls += 1
        ring[pos] = outcome
        self._failures += outcome & _FAILED
        self._slow += (outcome & _SLOW) >> 1
        pos += 1
        self._pos = 0 if pos == len(ring) else pos

    def _check_rates(self, last: str) -> None:
        """Open when the window is full enough and a rate has reached its threshold."""
        cfg = self._config
        calls = self._calls
        if calls < cfg.minimum_calls:
            return
        if self._failures >= cfg.failure_rate * calls:
            self._open(f"failure rate {self._failures}/{calls} (last: {last})", self._source)
        elif self._slow >= cfg.slow_call_rate * calls:
            self._open(f"slow call rate {self._slow}/{calls} (last: {last})", self._source)

    def _take_permit(self) -> bool:
        """Give back a half-open trial permit. False when none is out: the record belongs
        to a call that started before the breaker opened, and must not count as a trial."""
        if self._in_flight == 0:
            return False
        self._in_flight -= 1
        return True

    def _clear(self) -> None:
        self._ring[:] = bytes(len(self._ring))
        self._pos = self._calls = self._failures = self._slow = 0
        self._consecutive = 0
        self._trips = 0

    def _open(self, reason: str, source: str, open_for: float | None = None) -> None:
        check_transition(self._state, State.OPEN)  # before touching the trip count
        self._trips += 1
        period = self._config.open_period(self._trips) if open_for is None else max(0.0, open_for)
        self._open_until = self._clock() + period
        self._transition(State.OPEN, reason, source, period)

    def _close(self, reason: str, source: str) -> None:
        self._clear()
        self._transition(State.CLOSED, reason, source)

    def _transition(
        self, to_state: State, reason: str, source: str, open_for: float | None = None
    ) -> None:
        from_state = self._state
        check_transition(from_state, to_state)
        self._state = to_state
        # Permits of an earlier half-open phase do not carry over into a new one.
        self._in_flight = 0
        self._trial_successes = 0
        # DEBUG: the owner's callback writes the structured INFO line (provider, transition).
        logger.debug(
            "breaker %s: %s -> %s (%s, %s)", self.name, from_state, to_state, source, reason
        )
        callback = self._on_transition
        if callback is None:
            return
        event = Transition(
            name=self.name,
            from_state=from_state,
            to_state=to_state,
            reason=reason,
            source=source,
            at=self._clock(),
            open_for=open_for,
        )
        try:
            callback(event)
        except Exception:
            # A broken subscriber (telemetry, the bus) must not wedge the breaker: the
            # state has already moved, and the request path must keep working.
            logger.exception("breaker %s: transition callback failed", self.name)
