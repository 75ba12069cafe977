"""`python -m healthd report --since 24h [--json]`: the reliability report in a terminal.

The figures come from `bulwark.report.reliability_report`, the same function the admin
endpoint serves; this only parses the period, connects (DATABASE_URL) and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg

from bulwark.bus import CONNECTION_ERRORS
from bulwark.config import ConfigError, settings_from_env
from bulwark.report import duration_sec, format_report, reliability_report

#: Connecting and reading must not hang a terminal on an unreachable database.
CONNECT_TIMEOUT_SEC = 5.0
QUERY_TIMEOUT_SEC = 30.0
_DB_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


def parse_duration(text: str) -> float:
    """argparse's view of `bulwark.report.duration_sec`."""
    try:
        return duration_sec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


async def _fetch(dsn: str, since_sec: float) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SEC,
                                 command_timeout=QUERY_TIMEOUT_SEC,
                                 server_settings={"application_name": "bulwark-report"})
    try:
        return await reliability_report(conn, since_sec)
    finally:
        await conn.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m healthd report",
        description="Per provider availability, breaker opens, time to recover and failures "
                    "by class, from the history tables (DATABASE_URL).")
    parser.add_argument("--since", type=parse_duration, default=parse_duration("24h"),
                        help="the period, back from now: 24h (default), 30m, 7d, 3600")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        settings = settings_from_env()
    except ConfigError as err:
        print(f"healthd report: {err}", file=sys.stderr)
        return 2
    if not settings.database_url:
        print("healthd report: DATABASE_URL is not set", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_fetch(settings.database_url, args.since))
    except _DB_ERRORS as err:
        # The type only: a DSN (possibly with a password) never reaches the terminal log.
        print(f"healthd report: database unreachable ({type(err).__name__})", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_report(report))
    return 0
