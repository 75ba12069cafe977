"""`python -m schema migrate`: apply pending migrations to DATABASE_URL (the release step)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import asyncpg

from schema.migrate import MigrationError, discover, migrate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schema")
    parser.add_argument("command", choices=["migrate"])
    parser.parse_args(argv)
    dsn = os.environ.get("DATABASE_URL")
    if not dsn:
        print(
            "error: DATABASE_URL is not set. Point it at the Postgres to migrate, e.g. the "
            "embedded cluster's DSN printed by `python -m bulwark.pgembed start`.",
            file=sys.stderr,
        )
        return 2
    try:
        applied = asyncio.run(migrate(dsn))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
        # The DSN may carry a password: name the failure, not the URL.
        print(f"error: migration failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except MigrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    names = {m.version: m.name for m in discover()}
    for version in applied:
        print(f"applied {version:04d}_{names[version]}")
    latest = max(names, default=0)
    print(f"schema at version {latest:04d}" + ("" if applied else " (up to date)"), flush=True)
    if os.environ.get("HONCHO_PROCESS_NAME"):
        _hold()
    return 0


def _hold() -> None:
    """Under honcho any process that exits stops the whole formation (FACTS), so the
    release step, once done, waits quietly for the formation's SIGTERM instead. On a
    platform with a real release phase (no honcho) it exits as usual."""
    print("release done; idle until the formation stops (honcho)", flush=True)
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)


if __name__ == "__main__":
    sys.exit(main())
