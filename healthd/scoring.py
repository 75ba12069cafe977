"""From probe outcomes to a provider's health: a short window of samples, with hysteresis.

Pure: no I/O, no clock — a window only ever moves when a probe result is added, so tests
drive it sample by sample. The rules, checked in this order on every sample:

- UNKNOWN until the first sample.
- UNHEALTHY when the last `fail_streak` probes failed, or (with at least `fail_streak`
  samples) the success rate is below `unhealthy_rate`.
- DEGRADED when any probe in the window failed, or the mean latency of the successful ones
  is above `slow_ms`.
- HEALTHY otherwise.

Hysteresis, so that one blip does not flap the state everybody routes by:

- A single failure is never enough for UNHEALTHY (it takes `fail_streak` in a row, or a
  rate that one sample cannot produce); it gives DEGRADED, and HEALTHY returns only once
  the failure has left the window.
- Leaving UNHEALTHY takes `recover_streak` successes in a row; the window then restarts
  from those successes, because the failures of an outage that has ended say nothing about
  the provider now — that is what lets a recovered provider be HEALTHY after ~2 probes
  rather than after a whole window.
- Latency has a band: DEGRADED above `slow_ms`, HEALTHY again only below
  `slow_ms * slow_recover_ratio`.

With a 1 s interval a provider that starts failing is UNHEALTHY on its second failed probe
(within ~3 s) and HEALTHY again on its second good one.
"""

from __future__ import annotations

from collections import deque
from typing import Annotated, NamedTuple

import msgspec
from msgspec import Meta

from bulwark.state import Health


class ScoringConfig(msgspec.Struct, frozen=True, kw_only=True):
    #: Five samples: long enough that one blip is 20% (DEGRADED, not UNHEALTHY), short
    #: enough that the window forgets a blip within five intervals.
    window: Annotated[int, Meta(ge=2)] = 5
    fail_streak: Annotated[int, Meta(ge=1)] = 2
    recover_streak: Annotated[int, Meta(ge=1)] = 2
    unhealthy_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    #: A chat provider whose *model list* takes 2 s to come back will give slow first
    #: tokens too; users notice latency past ~2 s.
    slow_ms: Annotated[float, Meta(gt=0)] = 2000.0
    slow_recover_ratio: Annotated[float, Meta(gt=0, le=1)] = 0.75


class Sample(NamedTuple):
    ok: bool
    latency_ms: float
    error_class: str | None = None


class Verdict(NamedTuple):
    health: Health
    reason: str


class HealthWindow:
    """One provider's recent probe outcomes and the health they add up to."""

    __slots__ = ("_failures", "_samples", "_successes", "config", "verdict")

    def __init__(self, config: ScoringConfig | None = None) -> None:
        self.config = config or ScoringConfig()
        self._samples: deque[Sample] = deque(maxlen=self.config.window)
        self._successes = 0  # consecutive, ending with the latest sample
        self._failures = 0
        self.verdict = Verdict(Health.UNKNOWN, "no probe yet")

    @property
    def health(self) -> Health:
        return self.verdict.health

    @property
    def samples(self) -> tuple[Sample, ...]:
        return tuple(self._samples)

    def add(self, ok: bool, latency_ms: float, error_class: str | None = None) -> Verdict:
        """Record one probe outcome and return the health it leaves the provider in."""
        self._samples.append(Sample(ok, latency_ms, error_class))
        if ok:
            self._successes += 1
            self._failures = 0
        else:
            self._failures += 1
            self._successes = 0
        previous = self.verdict.health
        if previous is Health.UNHEALTHY:
            need = self.config.recover_streak
            if self._successes < need:
                if ok:
                    self.verdict = Verdict(Health.UNHEALTHY,
                                           f"recovering: {self._successes}/{need} good probes")
                else:
                    self.verdict = self._judge(previous)
                    if self.verdict.health is not Health.UNHEALTHY:
                        # A failure never improves an unhealthy provider, whatever the rate.
                        self.verdict = Verdict(Health.UNHEALTHY, self.verdict.reason)
                return self.verdict
            self._forget_outage()
        self.verdict = self._judge(previous)
        return self.verdict

    def _forget_outage(self) -> None:
        keep = list(self._samples)[-self._successes:]
        self._samples.clear()
        self._samples.extend(keep)

    def _judge(self, previous: Health) -> Verdict:
        cfg = self.config
        samples = self._samples
        n = len(samples)
        if self._failures >= cfg.fail_streak:
            last = samples[-1].error_class or "failure"
            return Verdict(Health.UNHEALTHY, f"{self._failures} probes failed in a row ({last})")
        good = [s.latency_ms for s in samples if s.ok]
        rate = len(good) / n
        if n >= cfg.fail_streak and rate < cfg.unhealthy_rate:
            return Verdict(Health.UNHEALTHY, f"{rate:.0%} of the last {n} probes succeeded")
        if rate < 1.0:
            return Verdict(Health.DEGRADED, f"{rate:.0%} of the last {n} probes succeeded")
        mean = sum(good) / len(good)
        limit = cfg.slow_ms
        if previous in (Health.DEGRADED, Health.UNHEALTHY):
            limit *= cfg.slow_recover_ratio
        if mean > limit:
            return Verdict(Health.DEGRADED, f"mean probe latency {mean:.0f} ms over {limit:.0f} ms")
        return Verdict(Health.HEALTHY, f"last {n} probes good, mean latency {mean:.0f} ms")
