"""The automatic degradation level, from healthy capacity per model, and the operator CLI.

Thresholds (docs/DEGRADATION.md). A provider is *usable* while its breaker is not open and
its health is not `unhealthy` (unknown counts as usable: no probe has said otherwise).
For each model, the share of its providers that are usable decides its level; the worst
model decides the fleet's:

    every provider of the model usable            normal
    at least half of them usable                  minor
    fewer than half, but at least one             moderate
    none                                          severe

healthd never sets `critical` by itself: calling no provider at all is a decision an
operator takes (`python -m healthd degrade critical --reason …`), not one to take on the
word of probes alone. The leader writes `degradation/auto` only when the level changes.

    python -m healthd degrade LEVEL --reason TEXT [--expires-in SEC]
    python -m healthd degrade auto
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec

from bulwark.bus import Bus
from bulwark.config import ConfigError, Provider, settings_from_env
from bulwark.degradation import (
    AUTO_KEY,
    LEVELS,
    Level,
    clear_operator,
    effective,
    set_operator,
)
from bulwark.state import Health, StateRow, View

log = logging.getLogger("healthd")

#: Re-evaluated at most this often (and at least once per probe interval); the inputs are
#: the view's rows, in memory, so this costs nothing but a loop over the providers.
CHECK_SEC: Final = 1.0


def usable(row: StateRow | None) -> bool:
    if row is None:
        return True
    return row.breaker != "open" and row.health is not Health.UNHEALTHY


def auto_level(providers: Sequence[Provider],
               rows: Mapping[str, StateRow]) -> tuple[Level, str]:
    """The fleet's level from healthy capacity per model, and why (the worst model)."""
    by_model: dict[str, list[str]] = {}
    for p in providers:
        for model in p.models:
            by_model.setdefault(model, []).append(p.name)
    worst, reason = Level.NORMAL, "every provider usable"
    for model in sorted(by_model):
        names = by_model[model]
        up = sum(usable(rows.get(n)) for n in names)
        if up == len(names):
            continue
        if up * 2 >= len(names):
            level = Level.MINOR
        elif up > 0:
            level = Level.MODERATE
        else:
            level = Level.SEVERE
        if level > worst:
            worst = level
            reason = f"model {model}: {up} of {len(names)} providers usable"
    return worst, reason


async def publish_auto(bus: Bus, view: View, providers: Sequence[Provider],
                       interval: float) -> None:
    """Leader duty: write `degradation/auto` whenever the computed level changes."""
    written: str | None = None  # written by us, not yet back through the bus
    while True:
        level, reason = auto_level(providers, view.rows)
        current = view.fleet_value(AUTO_KEY)
        known = current.get("level") if isinstance(current, dict) else None
        if known == level.label:
            written = None
        elif written != level.label:
            row = await bus.put_fleet(AUTO_KEY, {"level": level.label, "reason": reason,
                                                 "since": time.time()}, source="healthd")
            if row is not None:
                written = level.label
                log.warning("degradation level (auto) %s -> %s: %s", known, level.label,
                            reason)
        await asyncio.sleep(min(CHECK_SEC, interval))


# ---- the operator CLI -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m healthd degrade",
        description="Set the fleet's degradation level (an operator override), or go back "
                    "to the automatic level with `auto`.")
    parser.add_argument("level", choices=(*LEVELS, "auto"))
    parser.add_argument("--reason", help="why (required unless LEVEL is auto)")
    parser.add_argument("--expires-in", type=float, metavar="SEC",
                        help="the override ends by itself after SEC seconds")
    parser.add_argument("--by", default=None,
                        help="who sets it (default: cli:USER@HOST)")
    return parser


async def _degrade(dsn: str, args: argparse.Namespace, by: str) -> int:
    view = View()
    bus = Bus(dsn, view, name=f"healthd-cli {by}")
    try:
        if args.level == "auto":
            row = await clear_operator(bus, by=by)
        else:
            row = await set_operator(bus, Level.parse(args.level), reason=args.reason,
                                     expires_in=args.expires_in, by=by)
        if row is None:
            print("healthd degrade: the database is unreachable; nothing changed",
                  file=sys.stderr)
            return 1
        # What every process now applies (read back from the database).
        await bus.start()
        if view.synced:
            _, status = effective(view, time.time())
            print(msgspec.json.encode(status).decode())
        else:
            print(msgspec.json.encode(row.value).decode())
        return 0
    finally:
        await bus.close()


def degrade_main(argv: Sequence[str]) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv))
    if args.level != "auto" and not (args.reason and args.reason.strip()):
        parser.error("--reason is required when setting a level")
    if args.expires_in is not None and not args.expires_in > 0:
        parser.error("--expires-in must be positive")
    try:
        settings = settings_from_env()
    except ConfigError as err:
        print(f"healthd degrade: {err}", file=sys.stderr)
        return 2
    if not settings.database_url:
        print("healthd degrade: DATABASE_URL is not set (the level lives in Postgres)",
              file=sys.stderr)
        return 2
    by = args.by or f"cli:{getpass.getuser()}@{socket.gethostname()}"
    return asyncio.run(_degrade(settings.database_url, args, by))
