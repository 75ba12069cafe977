"""The in-memory view of shared provider state that the request path reads.

Rows come from Postgres (`provider_state`) through the bus: a snapshot on every
(re)connect, then one NOTIFY per change. Each row has its own `seq`, bumped by exactly one
on every write, so a process that sees seq jump by more than one knows it missed a
notification and reloads. Nothing here does I/O; the bus feeds it, subscribers (the web
process's breakers, healthd's scheduler) react to it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class StateRow(msgspec.Struct, frozen=True, kw_only=True):
    """One provider's shared state, as stored and as carried in a NOTIFY payload."""

    provider: str
    health: Health = Health.UNKNOWN
    breaker: str = "closed"  # a bulwark.breaker.State value
    reason: str = ""
    seq: int = 0
    #: Seconds the breaker stays open from the write (db clock), when open.
    open_for: float | None = None
    updated_by: str = ""


class FleetRow(msgspec.Struct, frozen=True, kw_only=True):
    """One fleet-wide setting (`fleet_state`): degradation level, client key, override.

    `value` is any JSON; None means the key was deleted. Like provider rows, each key has
    its own seq, bumped by one per write, so a missed notification shows as a gap.
    """

    key: str
    value: Any = None
    seq: int = 0
    updated_by: str = ""


row_decoder = msgspec.json.Decoder(StateRow)
fleet_decoder = msgspec.json.Decoder(FleetRow)
row_encoder = msgspec.json.Encoder()

Applied = Literal["applied", "stale", "gap"]


class View:
    """Provider state as last heard from Postgres. Single-threaded (one event loop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.rows: dict[str, StateRow] = {}
        self._subscribers: list[Callable[[StateRow], None]] = []
        self._clock = clock
        #: healthd's heartbeat age by the database's clock, and when we last measured it.
        self._healthd_age: float | None = None
        self._healthd_measured_at: float | None = None
        self.synced = False  # a snapshot has been loaded since the last (re)connect
        #: Fleet-wide settings by key (see FleetRow); deleted keys are absent.
        self.fleet: dict[str, FleetRow] = {}
        self._fleet_seq: dict[str, int] = {}
        self._fleet_subscribers: list[Callable[[FleetRow], None]] = []

    def subscribe(self, callback: Callable[[StateRow], None]) -> None:
        self._subscribers.append(callback)

    def _emit(self, row: StateRow) -> None:
        for callback in self._subscribers:
            callback(row)

    def replace(self, rows: Iterable[StateRow]) -> None:
        """Load a full snapshot; subscribers hear about every row that changed."""
        fresh = {r.provider: r for r in rows}
        self.synced = True
        for name, row in fresh.items():
            old = self.rows.get(name)
            self.rows[name] = row
            if old is None or old.seq != row.seq:
                self._emit(row)

    def apply(self, row: StateRow) -> Applied:
        """Apply one notified row. "gap" means the caller must reload a snapshot."""
        old = self.rows.get(row.provider)
        current = old.seq if old is not None else 0
        if row.seq <= current:
            return "stale"
        if row.seq > current + 1 and old is not None:
            return "gap"
        self.rows[row.provider] = row
        self._emit(row)
        return "applied"

    def subscribe_fleet(self, callback: Callable[[FleetRow], None]) -> None:
        """Hear about every fleet row that changes (a deleted key arrives with value None)."""
        self._fleet_subscribers.append(callback)

    def fleet_value(self, key: str, default: Any = None) -> Any:
        row = self.fleet.get(key)
        return default if row is None else row.value

    def _set_fleet(self, row: FleetRow) -> None:
        self._fleet_seq[row.key] = row.seq
        if row.value is None:
            self.fleet.pop(row.key, None)
        else:
            self.fleet[row.key] = row
        for callback in self._fleet_subscribers:
            callback(row)

    def replace_fleet(self, rows: Iterable[FleetRow]) -> None:
        """Load a full snapshot of fleet rows; keys gone from it are deleted."""
        fresh = {r.key: r for r in rows}
        for key in list(self._fleet_seq):
            if key not in fresh and key in self.fleet:
                self._set_fleet(FleetRow(key=key, value=None, seq=self._fleet_seq[key]))
        for key, row in fresh.items():
            if self._fleet_seq.get(key) != row.seq:
                self._set_fleet(row)

    def apply_fleet(self, row: FleetRow) -> Applied:
        current = self._fleet_seq.get(row.key, 0)
        if row.seq <= current:
            return "stale"
        if row.seq > current + 1 and row.key in self._fleet_seq:
            return "gap"
        self._set_fleet(row)
        return "applied"

    def note_healthd_age(self, age_sec: float | None) -> None:
        """Record healthd's heartbeat age, measured on the database clock (None: no healthd)."""
        self._healthd_age = age_sec
        self._healthd_measured_at = self._clock()

    def heard_age(self) -> float | None:
        """Seconds since the bus last heard from Postgres (its heartbeat query); None
        before the first. The view is at most this stale, plus NOTIFY delivery."""
        if self._healthd_measured_at is None:
            return None
        return self._clock() - self._healthd_measured_at

    def healthd_age(self) -> float | None:
        """Current estimate of healthd's heartbeat age; grows while we cannot measure it."""
        if self._healthd_age is None or self._healthd_measured_at is None:
            return None
        return self._healthd_age + (self._clock() - self._healthd_measured_at)

    def healthd_fresh(self, interval_sec: float) -> bool:
        """healthd is trusted while its heartbeat is younger than three intervals."""
        age = self.healthd_age()
        return age is not None and age <= 3 * interval_sec
