"""Router ordering: health tiers, then priority, then weight; open and cooling providers
left out (property-based, with hypothesis)."""

from __future__ import annotations

import random
from collections import Counter

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from bulwark.breaker import Breaker, BreakerConfig, State
from bulwark.config import ProviderConfig, Settings, resolve
from bulwark.providers.openai import OpenAIAdapter
from bulwark.state import Health, StateRow, View
from service.router import ProviderRuntime, Router


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _runtime(name: str, priority: int, weight: float, clock: FakeClock,
             session: aiohttp.ClientSession) -> ProviderRuntime:
    p = resolve(ProviderConfig(name=name, kind="openai", base_url="http://127.0.0.1:9/v1",
                               priority=priority, weight=weight, models={"m": "x"}), Settings())
    breaker = Breaker(name, BreakerConfig(auto_half_open=False), clock=clock)
    return ProviderRuntime(p, OpenAIAdapter(p, session, retry_after_cap=10), breaker)


provider_specs = st.lists(
    st.tuples(st.integers(1, 3), st.sampled_from([0.5, 1.0, 3.0]),
              st.sampled_from(list(Health)), st.sampled_from(list(State)), st.booleans()),
    min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(specs=provider_specs, trusted=st.booleans(), seed=st.integers(0, 1000))
async def test_plan_orders_by_tier_then_priority_and_skips_unusable(
        specs: list[tuple[int, float, Health, State, bool]], trusted: bool, seed: int) -> None:
    """Every usable candidate appears once; open and rate-limited ones never; healthy
    before degraded before unhealthy/half-open (when healthd is trusted); then priority."""
    clock = FakeClock()
    view = View(clock=clock)
    async with aiohttp.ClientSession() as session:
        runtimes = [_runtime(f"p{i}", prio, w, clock, session)
                    for i, (prio, w, _, _, _) in enumerate(specs)]
        for rt, (_, _, health, state, cooling) in zip(runtimes, specs, strict=True):
            view.apply(StateRow(provider=rt.name, health=health, seq=1))
            rt.breaker.apply_remote(state, "test", open_for=30)
            if cooling:
                rt.cooldown_until = clock.now + 5
        if trusted:
            view.note_healthd_age(0.0)
        router = Router(runtimes, view, healthd_interval=1.0, clock=clock,
                        rng=random.Random(seed))
        plan = router.plan("m")

    usable = {rt.name for rt, (_, _, _, state, cooling) in zip(runtimes, specs, strict=True)
              if state is not State.OPEN and not cooling}
    assert {rt.name for rt in plan.order} == usable
    assert len(plan.order) == len(usable)

    def tier(rt: ProviderRuntime) -> int:
        if rt.breaker.state is State.HALF_OPEN:
            return 2
        if not trusted:
            return 0
        health = view.rows[rt.name].health
        return {Health.UNHEALTHY: 2, Health.DEGRADED: 1}.get(health, 0)

    keys = [(tier(rt), rt.provider.priority) for rt in plan.order]
    assert keys == sorted(keys)
    if usable:
        assert plan.all_rate_limited is False
    if all(cooling for *_, cooling in specs):
        assert plan.all_rate_limited


async def test_equal_priorities_share_load_by_weight() -> None:
    """Among equal priorities the first pick follows the weights (3:1 here)."""
    clock = FakeClock()
    async with aiohttp.ClientSession() as session:
        heavy = _runtime("heavy", 1, 3.0, clock, session)
        light = _runtime("light", 1, 1.0, clock, session)
        router = Router([heavy, light], View(clock=clock), healthd_interval=1.0, clock=clock,
                        rng=random.Random(42))
        firsts = Counter(router.plan("m").order[0].name for _ in range(4000))
    share = firsts["heavy"] / 4000
    assert 0.71 < share < 0.79  # 0.75 expected; bounds are > 5 standard deviations wide


async def test_lower_priority_number_first_and_unknown_model_empty() -> None:
    """Priority 1 before 2 regardless of weight; a model nobody lists has no candidates."""
    clock = FakeClock()
    async with aiohttp.ClientSession() as session:
        a = _runtime("a", 2, 100.0, clock, session)
        b = _runtime("b", 1, 0.5, clock, session)
        router = Router([a, b], View(clock=clock), healthd_interval=1.0, clock=clock)
        assert [rt.name for rt in router.plan("m").order] == ["b", "a"]
        assert router.plan("nope").order == []
