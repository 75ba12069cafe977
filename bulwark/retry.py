"""When to try the same provider again, and how long to wait first.

Why not aiohttp-retry: it retries at the level of one HTTP request, blind to what we must
weigh together — the error table (only some classes retry; a refused connection fails
over at once), the breaker (each attempt is counted), failover to the next provider, the
global cap on attempts, the request's deadline, and streams, where a failure after the
first token must not be retried at all. Its defaults retry POST on every 5xx, ignore
Retry-After and leave retried responses unreleased (FACTS). So the attempt loop is ours
(service/router.py) and this module is its policy, stamina-style: an explicit predicate
that returns a delay, full jitter, bounded by attempts and deadline, and a switch that turns
sleeping off in tests.
"""

from __future__ import annotations

import random

import msgspec

from bulwark.errors import UpstreamError


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    base_sec: float = 0.2
    #: A chat user waits for the whole chain; more than 2 s between tries of one provider is
    #: better spent on the next provider.
    cap_sec: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full jitter (AWS architecture blog): uniform(0, min(cap, base * 2**attempt))."""
        ceiling = min(self.cap_sec, self.base_sec * (2 ** attempt))
        return (rng or random).uniform(0.0, ceiling)


def retry_delay(err: UpstreamError, *, attempt: int, retries: int, backoff: Backoff,
                time_left: float, rng: random.Random | None = None) -> float | None:
    """Seconds to wait before trying the same provider again, or None to move on.

    `attempt` counts this provider's attempts so far from 0. An upstream's Retry-After
    replaces the computed backoff, but only while it is no longer than the backoff cap:
    a provider asking for a longer pause is better replaced by the next one now. A wait that
    would not leave time for the retry itself is pointless too: "move on".
    """
    if not err.policy.retry or attempt >= retries:
        return None
    if err.retry_after is not None:
        if err.retry_after > backoff.cap_sec:
            return None
        wait = err.retry_after
    else:
        wait = backoff.delay(attempt, rng)
    if wait >= time_left:
        return None
    return wait
