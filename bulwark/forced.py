"""Operator overrides of a breaker: the fleet row `breaker/forced/<provider>`.

`{"reason", "since", "expires_at" (unix seconds, or null: until reset), "by"}`. While it
is present and not expired, no web process sends the provider traffic (the router leaves
it out) and healthd does not start the breaker's recovery. Both sides turn the wall-clock
expiry into a deadline on their own monotonic clock when the row arrives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

PREFIX = "breaker/forced/"


def key(provider: str) -> str:
    return PREFIX + provider


def provider_of(fleet_key: str) -> str | None:
    return fleet_key[len(PREFIX):] if fleet_key.startswith(PREFIX) else None


def deadline(value: Any, *, monotonic: Callable[[], float] = time.monotonic,
             wall: Callable[[], float] = time.time) -> float:
    """The monotonic time until which a forced row holds: 0 when absent, inf without expiry."""
    if not isinstance(value, dict):
        return 0.0
    expires = value.get("expires_at")
    if expires is None:
        return math.inf
    try:
        return monotonic() + (float(expires) - wall())
    except (TypeError, ValueError):
        return math.inf  # unreadable expiry: hold until an operator resets it
