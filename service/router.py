"""Which providers may answer a model, and in what order.

The order is decided from memory only — the local breakers and the shared `View` that the
bus keeps fresh — so picking never waits on Postgres or healthd (DESIGN principle 1).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import msgspec

from bulwark.breaker import Breaker, State
from bulwark.config import Provider
from bulwark.providers.base import Adapter
from bulwark.state import Health, View
from service.bulkhead import Bulkhead


class ProviderRuntime:
    """A provider with what the web process keeps about it at run time."""

    __slots__ = ("adapter", "breaker", "cooldown_until", "forced_until", "provider", "slots")

    def __init__(self, provider: Provider, adapter: Adapter, breaker: Breaker, *,
                 wait_sec: float = 0.1) -> None:
        self.provider = provider
        self.adapter = adapter
        self.breaker = breaker
        #: monotonic time before which the provider asked us (429 Retry-After) to stay away.
        self.cooldown_until = 0.0
        #: monotonic time until which an operator forced its breaker open (inf: until reset).
        self.forced_until = 0.0
        #: Upstream requests in flight to it from this process (its bulkhead).
        self.slots = Bulkhead(provider.max_in_flight, wait_sec=wait_sec)

    @property
    def name(self) -> str:
        return self.provider.name


class Plan(msgspec.Struct, frozen=True):
    """Candidates in the order to try them, and what was left out and why."""

    order: list[ProviderRuntime]
    #: Smallest wait until a left-out provider may be tried again (rate limit or breaker).
    cooling_for: float | None
    all_rate_limited: bool


# Tiers, tried in this order; within a tier by priority, then weighted random.
_TIER_GOOD, _TIER_DEGRADED, _TIER_LAST_RESORT = 0, 1, 2


class Router:
    def __init__(self, runtimes: list[ProviderRuntime], view: View, *, healthd_interval: float,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.runtimes = {rt.name: rt for rt in runtimes}
        self.view = view
        self._interval = healthd_interval
        self._clock = clock
        self._rng = rng or random.Random()
        self._by_model: dict[str, list[ProviderRuntime]] = {}
        for rt in runtimes:
            for model in rt.provider.models:
                self._by_model.setdefault(model, []).append(rt)

    def models(self) -> list[str]:
        return sorted(self._by_model)

    def has_model(self, model: str) -> bool:
        return model in self._by_model

    def shared_health_trusted(self) -> bool:
        return self.view.healthd_fresh(self._interval)

    def _tier(self, rt: ProviderRuntime, trusted: bool) -> int:
        if rt.breaker.state is State.HALF_OPEN:
            return _TIER_LAST_RESORT
        if not trusted:
            return _TIER_GOOD
        row = self.view.rows.get(rt.name)
        health = row.health if row is not None else Health.UNKNOWN
        if health is Health.UNHEALTHY:
            return _TIER_LAST_RESORT
        if health is Health.DEGRADED:
            return _TIER_DEGRADED
        return _TIER_GOOD

    def plan(self, model: str) -> Plan:
        candidates = self._by_model.get(model, [])
        now = self._clock()
        trusted = self.shared_health_trusted()
        keyed: list[tuple[int, int, float, ProviderRuntime]] = []
        waits: list[float] = []
        limited = 0
        for rt in candidates:
            if rt.forced_until > now:
                # Forced open by an operator: no traffic, whatever the breaker says.
                waits.append(min(rt.forced_until - now, 60.0))
                continue
            if rt.cooldown_until > now:
                waits.append(rt.cooldown_until - now)
                limited += 1
                continue
            if rt.breaker.state is State.OPEN:
                wait = rt.breaker.retry_in()
                # A passive breaker whose open period is over may let a trial call through.
                if wait > 0 or not rt.breaker.config.auto_half_open:
                    waits.append(max(wait, 1.0))
                    continue
            # Efraimidis-Spirakis: sorting by u**(1/w) descending is a weighted shuffle;
            # -log(u)/w ascending is the same order without a pow per candidate.
            key = (-math.log(1.0 - self._rng.random()) / rt.provider.weight
                   if len(candidates) > 1 else 0.0)
            keyed.append((self._tier(rt, trusted), rt.provider.priority, key, rt))
        if len(keyed) > 1:
            keyed.sort(key=lambda k: k[:3])
        return Plan(
            order=[k[3] for k in keyed],
            cooling_for=min(waits) if waits else None,
            all_rate_limited=bool(candidates) and limited == len(candidates),
        )
