"""The fleet's degradation level: one of five, the same in every process.

Two fleet rows (CONTRACT.md "Degradation", bulwark/bus.py `put_fleet`):

- `degradation/auto` `{"level", "reason", "since"}`: healthd's level from healthy capacity
  (healthd/degradation.py);
- `degradation/operator` `{"level", "reason", "since", "expires_at" | null, "by"}`: an
  operator's override; deleted = automatic.

Effective level: the operator's while present and not expired, else healthd's, else
`normal`. Expiry is honoured on read, against this host's wall clock (epoch seconds, as
written), so an expired override stops applying everywhere at the same moment without any
write. What each level changes is in docs/DEGRADATION.md; the dispatcher applies it.

`Degradation` keeps the effective level in memory for the request path (one attribute
read and one float comparison per request); the view's fleet callbacks recompute it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec

from bulwark.state import FleetRow, View

log = logging.getLogger("bulwark.degradation")

AUTO_KEY = "degradation/auto"
OPERATOR_KEY = "degradation/operator"


class Level(enum.IntEnum):
    NORMAL = 0
    MINOR = 1
    MODERATE = 2
    SEVERE = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        # A table, not name.lower(): every chat response carries it (Enum.name is a
        # descriptor, slow for what it is).
        return _LABELS[self]

    @classmethod
    def parse(cls, text: str) -> Level:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(m.label for m in cls)
            raise ValueError(f"unknown degradation level {text!r} (one of {names})") from None


_LABELS: dict[Level, str] = {level: level.name.lower() for level in Level}


LEVELS = tuple(m.label for m in Level)


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /health/degradation`."""

    level: str
    source: Literal["auto", "operator"]
    reason: str
    since: float | None
    expires_at: float | None


class _Row(msgspec.Struct, kw_only=True):
    level: str
    reason: str = ""
    since: float | None = None
    expires_at: float | None = None
    by: str = ""


NORMAL_STATUS = Status(level="normal", source="auto", reason="", since=None, expires_at=None)


def _parse(value: Any) -> tuple[Level, _Row] | None:
    if value is None:
        return None
    try:
        row = msgspec.convert(value, _Row)
        return Level.parse(row.level), row
    except (msgspec.ValidationError, ValueError):
        log.warning("ignoring an invalid degradation row: %r", value)
        return None


def effective(view: View, now: float) -> tuple[Level, Status]:
    """The level in force at `now` (epoch seconds), and what `/health/degradation` says."""
    op = _parse(view.fleet_value(OPERATOR_KEY))
    if op is not None:
        level, row = op
        if row.expires_at is None or now < row.expires_at:
            return level, Status(level=level.label, source="operator", reason=row.reason,
                                 since=row.since, expires_at=row.expires_at)
    auto = _parse(view.fleet_value(AUTO_KEY))
    if auto is not None:
        level, row = auto
        return level, Status(level=level.label, source="auto", reason=row.reason,
                             since=row.since, expires_at=None)
    return Level.NORMAL, NORMAL_STATUS


class Degradation:
    """The effective level of this process, kept fresh by the view (no I/O)."""

    def __init__(self, view: View, clock: Callable[[], float] = time.time) -> None:
        self._view = view
        self._clock = clock
        self._level = Level.NORMAL
        self._status = NORMAL_STATUS
        self._expires_at: float | None = None
        self._recompute()
        view.subscribe_fleet(self._on_fleet)

    def _on_fleet(self, row: FleetRow) -> None:
        if row.key in (AUTO_KEY, OPERATOR_KEY):
            self._recompute()

    def _recompute(self) -> None:
        level, status = effective(self._view, self._clock())
        if level is not self._level:
            log.warning("degradation level %s -> %s", self._level.label, level.label,
                        extra={"source": status.source, "reason": status.reason})
        self._level, self._status = level, status
        self._expires_at = status.expires_at

    @property
    def level(self) -> Level:
        if self._expires_at is not None and self._clock() >= self._expires_at:
            self._recompute()
        return self._level

    def status(self) -> Status:
        self.level  # noqa: B018 - honours an expiry before answering
        return self._status


class FleetWriter(Protocol):
    async def put_fleet(self, key: str, value: Any, *, source: str) -> FleetRow | None: ...


async def set_operator(bus: FleetWriter, level: Level, *, reason: str,
                       expires_in: float | None, by: str) -> FleetRow | None:
    """An operator's override, fleet-wide (the CLI and the admin API both call this).
    None when Postgres is unreachable."""
    now = time.time()
    value = {"level": level.label, "reason": reason, "since": now,
             "expires_at": None if expires_in is None else now + expires_in, "by": by}
    return await bus.put_fleet(OPERATOR_KEY, value, source=by)


async def clear_operator(bus: FleetWriter, *, by: str) -> FleetRow | None:
    """Back to the automatic level everywhere."""
    return await bus.put_fleet(OPERATOR_KEY, None, source=by)
