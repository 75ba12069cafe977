"""Breaker recovery: healthd's probes, not user requests, test an open provider.

Web processes trip breakers on their own traffic and publish "open". healthd keeps a
mirror `Breaker` per provider, fed from the shared rows. When a mirror's open period is
over, healthd moves it to HALF_OPEN and says so to everyone; its next probes are the trial
calls; enough successes close it, a failure opens it again for longer (the breaker grows
the period with its trip count). Every such move of healthd's own is queued in `outbox`
for the publisher; moves adopted from the shared state are not republished.

Pure: no I/O, no asyncio; time is the injected clock, so tests drive it by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from bulwark.breaker import Breaker, BreakerConfig, State, Transition
from bulwark.state import StateRow

log = logging.getLogger("healthd.recovery")

#: What healthd writes as `source`; rows carrying it are healthd's own (echoes).
SOURCE = "healthd"


class Recovery:
    """Mirror breakers for the configured providers, and the trial bookkeeping."""

    def __init__(self, names: Iterable[str], config: BreakerConfig, *,
                 clock: Callable[[], float], source: str = SOURCE) -> None:
        self.source = source
        self.breakers: dict[str, Breaker] = {
            name: Breaker(name, config, clock=clock, on_transition=self._on_transition,
                          source="probe")
            for name in names
        }
        #: healthd's own transitions, oldest first, for the publisher to write.
        self.outbox: list[Transition] = []
        # Bumped on every transition of a breaker: a trial permit taken in an earlier phase
        # (before a remote reset, say) must not be counted in the next one.
        self._phase: dict[str, int] = dict.fromkeys(self.breakers, 0)
        #: Permits `due()` took, waiting for the provider's next probe to claim them.
        self._permits: dict[str, int] = {}
        #: Breakers an operator forced open: no recovery before this (monotonic) time.
        self.held: dict[str, float] = {}
        self._clock = clock

    def hold(self, name: str, until: float) -> None:
        """Keep `name` open until `until` (monotonic; inf: until reset, 0: release)."""
        if until > 0:
            self.held[name] = until
        else:
            self.held.pop(name, None)

    def _held_for(self, name: str) -> float:
        until = self.held.get(name)
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self.held[name]
            return 0.0
        return left

    def _on_transition(self, t: Transition) -> None:
        self._phase[t.name] += 1
        log.info("breaker %s -> %s", t.from_state, t.to_state, extra={
            "provider": t.name, "transition": f"{t.from_state}->{t.to_state}",
            "reason": t.reason, "source": t.source})
        if t.source != "remote":
            self.outbox.append(t)

    def take_outbox(self) -> list[Transition]:
        out, self.outbox = self.outbox, []
        return out

    # -- the shared state ----------------------------------------------------------------------

    def adopt(self, row: StateRow, *, snapshot: bool = False) -> None:
        """Follow a shared row. Live rows written by healthd itself are echoes of what the
        mirror already did (possibly a step behind it), so only a snapshot — taken when this
        process becomes the leader — adopts them."""
        breaker = self.breakers.get(row.provider)
        if breaker is None:
            return
        if not snapshot and row.updated_by == self.source:
            return
        try:
            state = State(row.breaker)
        except ValueError:
            log.warning("unknown breaker state %r in the shared row", row.breaker,
                        extra={"provider": row.provider})
            return
        breaker.apply_remote(state, row.reason or "shared state", open_for=row.open_for)

    # -- time ----------------------------------------------------------------------------------

    def due(self) -> list[str]:
        """Move every breaker whose open period is over to HALF_OPEN; their names.

        The trial permit taken here waits for the provider's next probe to claim it.
        """
        ready: list[str] = []
        for name, breaker in self.breakers.items():
            if self._held_for(name) > 0:
                continue
            if breaker.state is State.OPEN and breaker.retry_in() <= 0 and breaker.allow():
                # allow() has just moved it to HALF_OPEN (auto_half_open), so the phase is
                # read after it.
                self._permits[name] = self._phase[name]
                ready.append(name)
        return ready

    def next_due_in(self) -> float | None:
        """Seconds until the next open period ends; None when no breaker is open."""
        waits = [max(b.retry_in(), self._held_for(name))
                 for name, b in self.breakers.items() if b.state is State.OPEN]
        return min(waits) if waits else None

    # -- probes as trials -----------------------------------------------------------------------

    def before_probe(self, name: str) -> int | None:
        """A probe of `name` starts now. Returns its trial token when it is a trial (hand it
        to `after_probe`), None otherwise. A probe already running when the breaker went
        half-open never counts: it was not sent as a trial."""
        breaker = self.breakers.get(name)
        if breaker is None:
            return None
        phase = self._permits.pop(name, None)
        if phase is not None and phase == self._phase[name]:
            return phase
        if self._held_for(name) > 0:
            return None  # forced open by an operator: its probes are not trials
        # allow() says yes to every call while CLOSED (no trial then), no while OPEN before
        # the period is over, and hands out trial permits otherwise (moving to HALF_OPEN
        # first when the period has just ended).
        if breaker.state is not State.CLOSED and breaker.allow():
            return self._phase[name]
        return None

    def after_probe(self, name: str, token: int | None, *, ok: bool, duration_sec: float,
                    reason: str) -> None:
        """Count a finished probe as a trial, if it was one."""
        breaker = self.breakers.get(name)
        if breaker is None or token is None:
            return
        if token != self._phase[name] or breaker.state is not State.HALF_OPEN:
            return  # the breaker moved while the probe ran: its permit is void
        if ok:
            breaker.record_success(duration_sec)
        else:
            breaker.record_failure(duration_sec, reason)
