"""Who hears about each failed upstream attempt, besides the breaker.

The dispatcher's observer (service/observe.py) hands each failure to every `FailureSink`
(the `service_errors` recorder, the recent-failure ring below). They run on the request
path: each does constant work in memory and never awaits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from bulwark.errors import UpstreamError

#: The error mix of `/health/detailed` covers the last five minutes.
MIX_WINDOW_SEC = 300.0
#: A storm of failures keeps only the newest this many; at ~30 bytes each, memory stays
#: bounded and a five-minute mix of a few thousand failures a minute is still exact.
RING_SIZE = 20_000


class FailureSink(Protocol):
    """Hears about each failed upstream attempt: the `service_errors` recorder, the
    recent-failure ring below."""

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None: ...


class RecentFailures:
    """This process's classified upstream failures of the last minutes, by provider and
    class: the "error mix" of `/health/detailed`. Only the class is kept (no request id,
    no detail), so nothing here can leak a prompt or a client identifier."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 size: int = RING_SIZE) -> None:
        self._clock = clock
        self._ring: deque[tuple[float, str, str]] = deque(maxlen=size)

    def attempt_failed(self, provider: str, err: UpstreamError, request_id: str,
                       model: str) -> None:
        self._ring.append((self._clock(), provider, str(err.cls)))

    def mix(self, window_sec: float = MIX_WINDOW_SEC) -> dict[str, dict[str, int]]:
        """{provider: {error class: failures}} over the last `window_sec` seconds."""
        cutoff = self._clock() - window_sec
        out: dict[str, dict[str, int]] = {}
        for at, provider, cls in reversed(self._ring):
            if at < cutoff:
                break
            by_class = out.setdefault(provider, {})
            by_class[cls] = by_class.get(cls, 0) + 1
        return out
